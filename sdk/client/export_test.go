package client

// SetMaxFrame lowers the frame bound for a test; the returned func restores
// it.
func SetMaxFrame(n int64) (restore func()) {
	old := maxFrame
	maxFrame = n
	return func() { maxFrame = old }
}
