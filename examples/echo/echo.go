package echo

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Header and trailer names used by the echo service, in canonical form.
const (
	// HeaderService, HeaderUnit and HeaderRegion are set on every response to
	// the Info the handler was built with.
	HeaderService = "X-Echo-Service"
	HeaderUnit    = "X-Echo-Unit"
	HeaderRegion  = "X-Echo-Region"

	// HeaderSmall set to "1" on a request to an echo route asks for the short
	// plain-text answer "unit=<unit> region=<region>\n" instead of the JSON.
	HeaderSmall = "X-Echo-Small"

	// TrailerSHA256 is the trailer of a /bytes answer: the hex SHA-256 of the
	// body that was sent.
	TrailerSHA256 = "X-Echo-Sha256"
)

// Limits of the query parameters.
const (
	// MaxBytes is the largest n /bytes accepts: 1 TiB.
	MaxBytes = 1 << 40
	// MaxDelay is the longest wait /delay accepts.
	MaxDelay = 60 * time.Second
	// ChunkSize is the size of the chunks /bytes writes and flushes, and of
	// the buffer a request body is read through.
	ChunkSize = 32 << 10
)

// patternPeriod is prime, so a chunk that is lost, repeated or reordered on
// the way breaks the pattern where it happened.
const patternPeriod = 251

// PatternByte returns byte i of every /bytes body: i mod 251.
func PatternByte(i int64) byte { return byte(i % patternPeriod) }

// pattern holds one chunk of the /bytes body starting at any offset:
// pattern[off%patternPeriod:][:ChunkSize] is the chunk at off.
var pattern = func() []byte {
	p := make([]byte, ChunkSize+patternPeriod)
	for i := range p {
		p[i] = PatternByte(int64(i))
	}
	return p
}()

// Info names the instance in every answer.
type Info struct{ Service, Unit, Region string }

// Response is the JSON answer of the echo routes.
type Response struct {
	Service string `json:"service"`
	Unit    string `json:"unit"`
	Region  string `json:"region"`
	Method  string `json:"method"`
	// Path is the decoded request path.
	Path string `json:"path"`
	// Query is the raw query string, without the '?'.
	Query string `json:"query"`
	Host  string `json:"host"`
	// Proto is "HTTP/1.1" or "HTTP/2.0".
	Proto string `json:"proto"`
	// Headers are all the request headers received, by canonical name, Host
	// excepted (it is in Host).
	Headers http.Header `json:"headers"`
	// BodyBytes and BodySHA256 describe the request body as read.
	BodyBytes  int64  `json:"body_bytes"`
	BodySHA256 string `json:"body_sha256"`
	// Trailers are the request trailers received after the body.
	Trailers http.Header `json:"trailers"`
}

// StatusResponse is the JSON answer of /status/{code}.
type StatusResponse struct {
	Status  int    `json:"status"`
	Service string `json:"service"`
	Unit    string `json:"unit"`
	Region  string `json:"region"`
}

// Handler returns the echo service for the instance info names. Its routes:
//
//   - /healthz answers 200 "ok".
//   - /metrics serves reg through promhttp when reg is also a
//     prometheus.Gatherer (a *prometheus.Registry is); otherwise 404.
//   - GET /bytes?n=N streams N bytes (0 <= N <= MaxBytes; byte i is
//     PatternByte(i)) in flushed chunks of ChunkSize, as
//     application/octet-stream, with the trailer TrailerSHA256. A bad n is
//     a 400, a method other than GET or HEAD a 405.
//   - /delay?ms=N waits N milliseconds (0 <= N <= 60000) or until the request
//     context ends, then answers as an echo route. A bad ms is a 400.
//   - /status/{code} answers code (200 to 599) with a StatusResponse body,
//     unless the code allows none; anything else under /status/ is a 400.
//   - Every other path is an echo route: it reads the body through SHA-256
//     without keeping it and answers 200 with a Response, or with the short
//     text "unit=<unit> region=<region>\n" when HeaderSmall is "1". A body
//     that cannot be read whole is a 400.
//
// Every response carries HeaderService, HeaderUnit and HeaderRegion. Errors
// are plain text. Paths are matched as sent, without cleaning or redirects.
//
// When reg is not nil, Handler registers cellmesh_echo_requests_total{code}
// (every request answered, /metrics included) and
// cellmesh_echo_request_body_bytes_total (request body bytes read) on it.
// Handlers sharing a registry share these counters; a registration refused
// for another reason leaves them counting but not exported.
func Handler(info Info, reg prometheus.Registerer) http.Handler {
	small := []byte("unit=" + info.Unit + " region=" + info.Region + "\n")
	h := &handler{
		info:     info,
		service:  one(info.Service),
		unit:     one(info.Unit),
		region:   one(info.Region),
		small:    small,
		smallLen: one(strconv.Itoa(len(small))),
		metrics:  newMetrics(reg),
	}
	if g, ok := reg.(prometheus.Gatherer); ok {
		h.promhttp = promhttp.HandlerFor(g, promhttp.HandlerOpts{})
	}
	return h
}

type handler struct {
	info Info
	// Header values set on every response, shared read-only.
	service, unit, region []string
	small                 []byte
	smallLen              []string
	metrics               *metrics     // nil: not counted
	promhttp              http.Handler // nil: /metrics is a 404
}

var _ http.Handler = (*handler)(nil)

// Header values shared read-only by all responses. Each has len == cap, so
// an append made by a wrapper copies instead of writing into them.
var (
	textPlain   = one("text/plain; charset=utf-8")
	appJSON     = one("application/json")
	octetStream = one("application/octet-stream")
	nosniff     = one("nosniff")
	trailerDecl = one(TrailerSHA256)
	allowBytes  = one("GET, HEAD")
	okBody      = []byte("ok")
	okLen       = one(strconv.Itoa(len(okBody)))
	noTrailers  = http.Header{}
)

// emptySHA256 is the SHA-256 of an empty body.
const emptySHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

func one(v string) []string { return []string{v}[:1:1] }

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	hdr[HeaderService] = h.service
	hdr[HeaderUnit] = h.unit
	hdr[HeaderRegion] = h.region

	switch p := r.URL.Path; {
	case p == "/healthz":
		h.healthz(w)
	case p == "/metrics":
		h.serveMetrics(w, r)
	case p == "/bytes":
		h.bytes(w, r)
	case p == "/delay":
		h.delay(w, r)
	case strings.HasPrefix(p, "/status/"):
		h.status(w, r, p[len("/status/"):])
	default:
		h.echo(w, r)
	}
}

func (h *handler) healthz(w http.ResponseWriter) {
	hdr := w.Header()
	hdr["Content-Type"] = textPlain
	hdr["Content-Length"] = okLen
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(okBody)
	h.metrics.request(http.StatusOK)
}

func (h *handler) serveMetrics(w http.ResponseWriter, r *http.Request) {
	if h.promhttp == nil {
		h.fail(w, http.StatusNotFound, "echo: no metrics registry")
		return
	}
	sw := &statusWriter{ResponseWriter: w}
	h.promhttp.ServeHTTP(sw, r)
	h.metrics.request(sw.code())
}

func (h *handler) bytes(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header()["Allow"] = allowBytes
		h.fail(w, http.StatusMethodNotAllowed, "echo: /bytes takes GET or HEAD, not "+r.Method)
		return
	}
	q := r.URL.Query()
	if !q.Has("n") {
		h.fail(w, http.StatusBadRequest, "echo: /bytes needs n, the number of bytes to send, from 0 to "+strconv.Itoa(MaxBytes))
		return
	}
	n, err := strconv.ParseInt(q.Get("n"), 10, 64)
	if err != nil || n < 0 || n > MaxBytes {
		h.fail(w, http.StatusBadRequest, fmt.Sprintf("echo: bad n %q: want a whole number of bytes from 0 to %d", q.Get("n"), MaxBytes))
		return
	}

	hdr := w.Header()
	hdr["Content-Type"] = octetStream
	hdr["Trailer"] = trailerDecl
	w.WriteHeader(http.StatusOK)
	h.metrics.request(http.StatusOK)
	if r.Method == http.MethodHead {
		return
	}

	s := getScratch()
	defer putScratch(s)
	ctx := r.Context()
	rc := http.NewResponseController(w)
	flush := true
	for off := int64(0); off < n; {
		start := off % patternPeriod
		chunk := pattern[start : start+min(ChunkSize, n-off)]
		s.hash.Write(chunk) // never fails
		if _, err := w.Write(chunk); err != nil {
			return // the client is gone; there is no one to tell
		}
		if flush {
			if err := rc.Flush(); errors.Is(err, http.ErrNotSupported) {
				flush = false
			} else if err != nil {
				return
			}
		}
		if ctx.Err() != nil {
			return
		}
		off += int64(len(chunk))
	}
	hdr[TrailerSHA256] = []string{hex.EncodeToString(s.hash.Sum(s.sum[:0]))}
}

func (h *handler) delay(w http.ResponseWriter, r *http.Request) {
	v := r.URL.Query().Get("ms")
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms < 0 || ms > MaxDelay.Milliseconds() {
		h.fail(w, http.StatusBadRequest, fmt.Sprintf("echo: bad ms %q: want a whole number of milliseconds from 0 to %d", v, MaxDelay.Milliseconds()))
		return
	}
	if ms > 0 {
		t := time.NewTimer(time.Duration(ms) * time.Millisecond)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
		}
	}
	h.echo(w, r)
}

func (h *handler) status(w http.ResponseWriter, r *http.Request, v string) {
	code, err := strconv.Atoi(v)
	if err != nil || len(v) != 3 || code < 200 || code > 599 {
		h.fail(w, http.StatusBadRequest, fmt.Sprintf("echo: bad status code %q: want 200 to 599 (a 1xx is not a final answer)", v))
		return
	}
	if code == http.StatusNoContent || code == http.StatusNotModified || r.Method == http.MethodHead {
		w.WriteHeader(code)
		h.metrics.request(code)
		return
	}
	body, err := json.Marshal(StatusResponse{Status: code, Service: h.info.Service, Unit: h.info.Unit, Region: h.info.Region})
	if err != nil { // cannot happen: strings and an int
		h.fail(w, http.StatusInternalServerError, "echo: "+err.Error())
		return
	}
	body = append(body, '\n')
	hdr := w.Header()
	hdr["Content-Type"] = appJSON
	hdr["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(code)
	_, _ = w.Write(body)
	h.metrics.request(code)
}

// echo reads the body through SHA-256 and answers what it received.
func (h *handler) echo(w http.ResponseWriter, r *http.Request) {
	v := r.Header[HeaderSmall]
	small := len(v) > 0 && v[0] == "1"

	s := getScratch()
	defer putScratch(s)
	n, err := h.readBody(r, s, !small)
	if err != nil {
		h.fail(w, http.StatusBadRequest, fmt.Sprintf("echo: reading the request body after %d bytes: %v", n, err))
		return
	}

	hdr := w.Header()
	if small {
		hdr["Content-Type"] = textPlain
		hdr["Content-Length"] = h.smallLen
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(h.small)
		h.metrics.request(http.StatusOK)
		return
	}

	sum := emptySHA256
	if n > 0 {
		sum = hex.EncodeToString(s.hash.Sum(s.sum[:0]))
	}
	headers := r.Header
	if headers == nil {
		headers = noTrailers
	}
	resp := Response{
		Service:    h.info.Service,
		Unit:       h.info.Unit,
		Region:     h.info.Region,
		Method:     r.Method,
		Path:       r.URL.Path,
		Query:      r.URL.RawQuery,
		Host:       r.Host,
		Proto:      r.Proto,
		Headers:    headers,
		BodyBytes:  n,
		BodySHA256: sum,
		Trailers:   receivedTrailers(r.Trailer),
	}
	s.out.Reset()
	enc := json.NewEncoder(&s.out)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(&resp); err != nil { // cannot happen: strings, ints and string maps
		h.fail(w, http.StatusInternalServerError, "echo: "+err.Error())
		return
	}
	hdr["Content-Type"] = appJSON
	hdr["Content-Length"] = []string{strconv.Itoa(s.out.Len())}
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(s.out.Bytes())
	h.metrics.request(http.StatusOK)
}

// readBody reads the whole request body through s.buf, into s.hash when
// hashing, and returns how many bytes it read.
func (h *handler) readBody(r *http.Request, s *scratch, hashing bool) (int64, error) {
	if r.Body == nil || r.Body == http.NoBody {
		return 0, nil
	}
	var dst io.Writer = onlyWriter{io.Discard}
	if hashing {
		dst = s.hash
	}
	n, err := io.CopyBuffer(dst, r.Body, s.buf[:])
	h.metrics.body(n)
	return n, err
}

// onlyWriter hides io.Discard's ReadFrom, so that reading goes through the
// pooled buffer.
type onlyWriter struct{ io.Writer }

// receivedTrailers returns the trailers that arrived with a value.
func receivedTrailers(t http.Header) http.Header {
	got := noTrailers
	for k, v := range t {
		if len(v) == 0 {
			continue // declared but not sent
		}
		if len(got) == 0 {
			got = make(http.Header, len(t))
		}
		got[k] = v
	}
	return got
}

// fail answers code with a plain-text message.
func (h *handler) fail(w http.ResponseWriter, code int, msg string) {
	hdr := w.Header()
	hdr["Content-Type"] = textPlain
	hdr["X-Content-Type-Options"] = nosniff
	w.WriteHeader(code)
	_, _ = io.WriteString(w, msg+"\n")
	h.metrics.request(code)
}

// scratch is the per-request memory of the body and /bytes paths, pooled so
// that the hot path allocates little and a large body never grows it.
type scratch struct {
	buf  [ChunkSize]byte
	hash hash.Hash
	sum  [sha256.Size]byte
	out  bytes.Buffer
}

// maxPooledOut bounds the JSON buffer kept in the pool; a request with huge
// headers gets a buffer that is dropped afterwards.
const maxPooledOut = 64 << 10

var scratchPool = sync.Pool{New: func() any { return &scratch{hash: sha256.New()} }}

func getScratch() *scratch {
	s := scratchPool.Get().(*scratch)
	s.hash.Reset()
	return s
}

func putScratch(s *scratch) {
	if s.out.Cap() > maxPooledOut {
		s.out = bytes.Buffer{}
	}
	scratchPool.Put(s)
}

// statusWriter remembers the status code written through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
