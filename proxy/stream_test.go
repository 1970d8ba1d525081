package proxy

import (
	"crypto/sha256"
	"encoding/hex"
	"hash"
	"io"
	"math/rand/v2"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cellmesh/cellmesh/examples/echo"
)

// patternReader yields n pseudo-random bytes without holding them, and
// hashes what it yields.
type patternReader struct {
	left  int64
	off   int
	block []byte
	sum   hash.Hash
}

func newPatternReader(n int64) *patternReader {
	block := make([]byte, 1<<20+7) // not a power of two, so chunks do not line up
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range block {
		block[i] = byte(rng.Uint32())
	}
	return &patternReader{left: n, block: block, sum: sha256.New()}
}

func (r *patternReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > r.left {
		p = p[:r.left]
	}
	n := copy(p, r.block[r.off:])
	r.off = (r.off + n) % len(r.block)
	r.left -= int64(n)
	r.sum.Write(p[:n])
	return n, nil
}

func (r *patternReader) sha256() string { return hex.EncodeToString(r.sum.Sum(nil)) }

// heapWatch samples HeapInuse every 50ms until stop is called, which
// returns the largest sample.
func heapWatch() (stop func() uint64) {
	runtime.GC()
	var (
		mu   sync.Mutex
		peak uint64
		done = make(chan struct{})
		wg   sync.WaitGroup
	)
	sample := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		mu.Lock()
		peak = max(peak, ms.HeapInuse)
		mu.Unlock()
	}
	sample()
	wg.Go(func() {
		tk := time.NewTicker(50 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-done:
				return
			case <-tk.C:
				sample()
			}
		}
	})
	return func() uint64 {
		close(done)
		wg.Wait()
		sample()
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}

// streamUpload sends size bytes, chunked, from us-east-1 to eu-west-1's app
// and checks that the app read them all, intact, with bounded memory.
func streamUpload(t *testing.T, m *mesh, size int64) {
	t.Helper()
	body := newPatternReader(size)
	req := m.newReq("POST", "us-east-1", uidEUWest1, "/upload", body)
	req.ContentLength = -1 // chunked: the sidecars cannot know the size
	c := &http.Client{Timeout: 90 * time.Second}
	stop := heapWatch()
	start := time.Now()
	resp, got := do(t, c, req)
	peak := stop()
	t.Logf("%d MiB in %s, peak HeapInuse %d MiB", size>>20, time.Since(start).Round(time.Millisecond), peak>>20)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, got)
	}
	e := decodeEcho(t, got)
	if e.Unit != "eu-west-1" {
		t.Errorf("answered by %s, want eu-west-1", e.Unit)
	}
	if e.BodyBytes != size || e.BodySHA256 != body.sha256() {
		t.Errorf("app read %d bytes with sha256 %s; sent %d with %s", e.BodyBytes, e.BodySHA256, size, body.sha256())
	}
	if peak >= 96<<20 {
		t.Errorf("HeapInuse reached %d MiB while streaming %d MiB: bodies are buffered", peak>>20, size>>20)
	}
}

// A 256 MiB upload streams through outbound, QUIC and inbound to the app.
func TestStreamUploadQUIC(t *testing.T) {
	if testing.Short() {
		t.Skip("256 MiB upload: not in -short")
	}
	m := newMesh(t, meshOpts{})
	streamUpload(t, m, 256<<20)
}

// A 64 MiB upload streams over the HTTP/2-on-TLS transport too.
func TestStreamUploadH2(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB upload: not in -short")
	}
	m := newMesh(t, meshOpts{h2Units: []string{"eu-west-1"}})
	streamUpload(t, m, 64<<20)
}

// A 64 MiB download streams back, and the app's response trailer (the
// sha256 of what it sent) passes through both hops.
func TestStreamDownloadTrailer(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB download: not in -short")
	}
	m := newMesh(t, meshOpts{})
	const size = 64 << 20
	c := &http.Client{Timeout: 90 * time.Second}
	stop := heapWatch()
	resp, err := c.Do(m.newReq("GET", "us-east-1", uidEUWest1, "/bytes?n="+strconv.Itoa(size), nil))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if got := resp.Header.Get("x-cellmesh-unit"); got != "eu-west-1" {
		t.Errorf("answered by %q, want eu-west-1", got)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	peak := stop()
	if err != nil {
		t.Fatalf("read body after %d bytes: %v", n, err)
	}
	if n != size {
		t.Fatalf("read %d bytes, want %d", n, size)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	// What the echo sends, computed here.
	want := sha256.New()
	chunk := make([]byte, echo.ChunkSize)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		for i := range chunk {
			chunk[i] = echo.PatternByte(off + int64(i))
		}
		want.Write(chunk)
	}
	if w := hex.EncodeToString(want.Sum(nil)); sum != w {
		t.Errorf("body sha256 %s, want the echo pattern's %s", sum, w)
	}
	if tr := resp.Trailer.Get(echo.TrailerSHA256); tr != sum {
		t.Errorf("trailer %s = %q, want the body's sha256 %s (trailers: %v)", echo.TrailerSHA256, tr, sum, resp.Trailer)
	}
	if peak >= 96<<20 {
		t.Errorf("HeapInuse reached %d MiB while streaming %d MiB", peak>>20, size>>20)
	}
}

// trailerBody sets the request's X-Checksum trailer once the body is read.
type trailerBody struct {
	r   io.Reader
	req *http.Request
	sum hash.Hash
}

func (b *trailerBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.sum.Write(p[:n])
	if err == io.EOF {
		b.req.Trailer.Set("X-Checksum", hex.EncodeToString(b.sum.Sum(nil)))
	}
	return n, err
}

// Request trailers sent after a chunked body reach the app.
func TestRequestTrailers(t *testing.T) {
	m := newMesh(t, meshOpts{h2Units: []string{"eu-west-2"}})
	c := newClient()
	for _, tc := range []struct{ name, uid, unit string }{
		{"quic", uidEUWest1, "eu-west-1"},
		{"h2", uidEUWest2, "eu-west-2"},
		{"local", uidUSEast1, "us-east-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := m.newReq("POST", "us-east-1", tc.uid, "/", nil)
			tb := &trailerBody{r: strings.NewReader(strings.Repeat("trailer test ", 10000)), req: req, sum: sha256.New()}
			req.Body = io.NopCloser(tb)
			req.ContentLength = -1
			req.Trailer = http.Header{"X-Checksum": nil}
			resp, body := do(t, c, req)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status %d: %s", resp.StatusCode, body)
			}
			e := decodeEcho(t, body)
			if e.Unit != tc.unit {
				t.Errorf("answered by %s, want %s", e.Unit, tc.unit)
			}
			want := req.Trailer.Get("X-Checksum")
			if want == "" {
				t.Fatal("the client never set the trailer")
			}
			got := e.Trailers.Get("X-Checksum")
			if got != want {
				t.Errorf("app saw trailer X-Checksum %q, want %q (trailers %v)", got, want, e.Trailers)
			}
			if e.BodyBytes != 130000 {
				t.Errorf("app read %d bytes, want 130000", e.BodyBytes)
			}
		})
	}
}

// The outbound listener speaks h2c to apps that use HTTP/2 without TLS.
func TestOutboundH2C(t *testing.T) {
	m := newMesh(t, meshOpts{h2Units: []string{"eu-west-2"}})
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: p}
	defer tr.CloseIdleConnections()
	c := &http.Client{Timeout: 10 * time.Second, Transport: tr}
	for _, uid := range []string{uidEUWest1, uidEUWest2, uidUSEast1} {
		resp, body := do(t, c, m.newReq("GET", "us-east-1", uid, "/", nil))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("uid %s: status %d: %s", uid, resp.StatusCode, body)
		}
		if resp.ProtoMajor != 2 {
			t.Errorf("uid %s: client spoke %s, want HTTP/2", uid, resp.Proto)
		}
		want, _ := homeOf(uid)
		if e := decodeEcho(t, body); e.Unit != want {
			t.Errorf("uid %s: answered by %s, want %s", uid, e.Unit, want)
		}
	}
	// A streamed body with a trailer over h2c, to a unit reached over
	// HTTP/2 (request trailers over QUIC: see TestRequestTrailers).
	req := m.newReq("POST", "us-east-1", uidEUWest2, "/", nil)
	tb := &trailerBody{r: strings.NewReader(strings.Repeat("x", 100000)), req: req, sum: sha256.New()}
	req.Body = io.NopCloser(tb)
	req.ContentLength = -1
	req.Trailer = http.Header{"X-Checksum": nil}
	resp, body := do(t, c, req)
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		t.Fatalf("h2c POST: %s status %d: %s", resp.Proto, resp.StatusCode, body)
	}
	e := decodeEcho(t, body)
	if e.BodyBytes != 100000 || e.Trailers.Get("X-Checksum") != req.Trailer.Get("X-Checksum") {
		t.Errorf("h2c POST: app read %d bytes, trailers %v; want 100000 and X-Checksum %s", e.BodyBytes, e.Trailers, req.Trailer.Get("X-Checksum"))
	}
}
