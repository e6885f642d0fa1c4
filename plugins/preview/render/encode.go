package render

import (
	"bytes"
	"fmt"
	"image"
	"image/jpeg"
	"image/png"
)

// Kind is an encoded image type. Its values are ComfyUI's websocket
// image_type numbers (1 = JPEG, 2 = PNG).
type Kind uint8

// The encodings.
const (
	JPEG Kind = 1
	PNG  Kind = 2
)

func (k Kind) String() string {
	switch k {
	case JPEG:
		return "jpeg"
	case PNG:
		return "png"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// MIME is the media type of the encoding.
func (k Kind) MIME() string {
	switch k {
	case JPEG:
		return "image/jpeg"
	case PNG:
		return "image/png"
	}
	return "application/octet-stream"
}

// DefaultJPEGQuality is used when Format.Quality is 0.
const DefaultJPEGQuality = 85

// Format is a job's preview encoding.
type Format struct {
	Kind Kind
	// Quality is the JPEG quality, 1..100; 0 means DefaultJPEGQuality. PNG
	// ignores it.
	Quality int
}

// pngEncoder favours speed, as ComfyUI (compress_level=1) and A1111 do for
// previews.
var pngEncoder = png.Encoder{CompressionLevel: png.BestSpeed}

// Encode encodes a preview image.
func Encode(img image.Image, f Format) ([]byte, error) {
	if img == nil || img.Bounds().Empty() {
		return nil, fmt.Errorf("encode %v: empty image", f.Kind)
	}
	var buf bytes.Buffer
	switch f.Kind {
	case JPEG:
		q := f.Quality
		if q == 0 {
			q = DefaultJPEGQuality
		}
		if q < 1 || q > 100 {
			return nil, fmt.Errorf("encode jpeg: quality %d out of range [1, 100]", f.Quality)
		}
		b := img.Bounds()
		buf.Grow(b.Dx() * b.Dy() / 4)
		if err := jpeg.Encode(&buf, img, &jpeg.Options{Quality: q}); err != nil {
			return nil, fmt.Errorf("encode jpeg: %w", err)
		}
	case PNG:
		if err := pngEncoder.Encode(&buf, img); err != nil {
			return nil, fmt.Errorf("encode png: %w", err)
		}
	default:
		return nil, fmt.Errorf("encode: format kind %v unknown (want jpeg or png)", f.Kind)
	}
	return buf.Bytes(), nil
}
