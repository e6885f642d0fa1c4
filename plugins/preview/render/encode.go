package render

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	"image/jpeg"
	"image/png"
	"runtime"
	"sync"

	"github.com/arenahost/arenahost/shared/preview/previewwire"
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

// ParseKind reads an encoding name ("jpeg", "jpg" or "png").
func ParseKind(s string) (Kind, error) {
	switch s {
	case "jpeg", "jpg":
		return JPEG, nil
	case "png":
		return PNG, nil
	}
	return 0, fmt.Errorf("image format %q unknown (want jpeg or png)", s)
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
const DefaultJPEGQuality = previewwire.DefaultJPEGQuality

// Format is a job's preview encoding.
type Format struct {
	Kind Kind
	// Quality is the JPEG quality, 1..100; 0 means DefaultJPEGQuality. PNG
	// ignores it.
	Quality int
}

// Validate checks the format, so that a job with a bad one is refused when
// it is created.
func (f Format) Validate() error {
	switch f.Kind {
	case JPEG:
		if f.Quality < 0 || f.Quality > 100 {
			return fmt.Errorf("format jpeg: quality %d out of range [1, 100] (0: default %d)", f.Quality, DefaultJPEGQuality)
		}
	case PNG:
	default:
		return fmt.Errorf("format: kind %v unknown (want jpeg or png)", f.Kind)
	}
	return nil
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
		if rgba, ok := img.(*image.RGBA); ok && b.Dx()*b.Dy() >= parallelJPEGPixels {
			if strips := min(runtime.GOMAXPROCS(0), (b.Dy()+15)/16); strips > 1 {
				out, err := encodeJPEGStrips(rgba, q, strips)
				if err != nil {
					return nil, fmt.Errorf("encode jpeg: %w", err)
				}
				return out, nil
			}
		}
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

// parallelJPEGPixels is the image size from which JPEG encoding is split
// among the cores (below it the goroutines cost more than they save).
const parallelJPEGPixels = 256 * 256

// encodeJPEGStrips encodes horizontal strips (whole 16-row MCU rows) with the
// standard library on separate cores and joins their entropy-coded segments
// with restart markers under one header carrying the full height and a DRI
// segment whose interval is one strip's MCU count. The standard library's
// tables do not depend on the image, every strip starts with zeroed DC
// predictors and ends byte-aligned (padded with 1 bits), which is exactly
// what a decoder assumes after each RSTn: the result is one baseline JPEG
// whose decoded pixels equal those of encoding the image in one piece.
func encodeJPEGStrips(img *image.RGBA, quality, strips int) ([]byte, error) {
	b := img.Bounds()
	mcuRows, mcuCols := (b.Dy()+15)/16, (b.Dx()+15)/16
	rowsPer := (mcuRows + strips - 1) / strips
	if mcuCols*rowsPer > 0xffff {
		rowsPer = 0xffff / mcuCols
	}
	if rowsPer < 1 {
		var buf bytes.Buffer
		err := jpeg.Encode(&buf, img, &jpeg.Options{Quality: quality})
		return buf.Bytes(), err
	}
	n := (mcuRows + rowsPer - 1) / rowsPer
	parts := make([][]byte, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			r := image.Rect(b.Min.X, b.Min.Y+16*rowsPer*i, b.Max.X, min(b.Max.Y, b.Min.Y+16*rowsPer*(i+1)))
			var buf bytes.Buffer
			buf.Grow(r.Dx() * r.Dy() / 4)
			errs[i] = jpeg.Encode(&buf, img.SubImage(r), &jpeg.Options{Quality: quality})
			parts[i] = buf.Bytes()
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	var out []byte
	for i, p := range parts {
		sof, sosStart, sosEnd, err := jpegSegments(p)
		if err != nil {
			return nil, fmt.Errorf("strip %d: %w", i, err)
		}
		if i == 0 {
			size := 0
			for _, q := range parts {
				size += len(q)
			}
			out = make([]byte, 0, size+16)
			out = append(out, p[:sosStart]...)
			binary.BigEndian.PutUint16(out[sof+5:], uint16(b.Dy()))
			out = append(out, 0xff, 0xdd, 0, 4, byte(mcuCols*rowsPer>>8), byte(mcuCols*rowsPer))
			out = append(out, p[sosStart:sosEnd]...)
		} else {
			out = append(out, 0xff, 0xd0+byte((i-1)%8))
		}
		out = append(out, p[sosEnd:len(p)-2]...)
	}
	return append(out, 0xff, 0xd9), nil
}

// jpegSegments finds, in a baseline JPEG written by image/jpeg, the offsets
// of its SOF0 marker and of the start and end of its SOS segment, and checks
// that it ends with EOI.
func jpegSegments(p []byte) (sof, sosStart, sosEnd int, err error) {
	if len(p) < 4 || p[0] != 0xff || p[1] != 0xd8 || p[len(p)-2] != 0xff || p[len(p)-1] != 0xd9 {
		return 0, 0, 0, errors.New("not a complete JPEG")
	}
	sof = -1
	for i := 2; i+4 <= len(p); {
		if p[i] != 0xff {
			return 0, 0, 0, fmt.Errorf("no marker at offset %d", i)
		}
		l := int(binary.BigEndian.Uint16(p[i+2:]))
		switch p[i+1] {
		case 0xc0:
			sof = i
		case 0xda:
			if sof < 0 || i+2+l > len(p)-2 {
				return 0, 0, 0, errors.New("SOS before SOF0 or past the end")
			}
			return sof, i, i + 2 + l, nil
		}
		i += 2 + l
	}
	return 0, 0, 0, errors.New("no SOS segment")
}
