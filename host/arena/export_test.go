package arena

// SetFillChunk sets WriteFrom's chunk size for a test and returns the
// function that restores it.
func SetFillChunk(n int64) (restore func()) {
	old := fillChunk
	fillChunk = n
	return func() { fillChunk = old }
}
