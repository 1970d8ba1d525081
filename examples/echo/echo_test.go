package echo_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"

	"github.com/cellmesh/cellmesh/examples/echo"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var testInfo = echo.Info{Service: "ledger", Unit: "us-east-1", Region: "us-east"}

// newServer serves h over HTTP/1.1 and h2c on loopback.
func newServer(t testing.TB, h http.Handler) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(h)
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv.Config.Protocols = &p
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// clients returns an HTTP/1.1 and an h2c client, by name.
func clients(t testing.TB) map[string]*http.Client {
	t.Helper()
	var h1, h2c http.Protocols
	h1.SetHTTP1(true)
	h2c.SetUnencryptedHTTP2(true)
	out := map[string]*http.Client{}
	for name, p := range map[string]*http.Protocols{"http1": &h1, "h2c": &h2c} {
		tr := &http.Transport{Protocols: p, DisableCompression: true}
		t.Cleanup(tr.CloseIdleConnections)
		out[name] = &http.Client{Transport: tr, Timeout: time.Minute}
	}
	return out
}

func do(t testing.TB, c *http.Client, req *http.Request) (*http.Response, []byte) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", req.Method, req.URL, err)
	}
	return resp, body
}

func decode[T any](t testing.TB, body []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(body, &v); err != nil {
		t.Fatalf("decoding %q: %v", body, err)
	}
	return v
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func patternBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = echo.PatternByte(int64(i))
	}
	return b
}

func TestRoutes(t *testing.T) {
	reg := prometheus.NewRegistry()
	srv := newServer(t, echo.Handler(testInfo, reg))
	client := clients(t)["http1"]

	// echoed checks a JSON echo answer.
	echoed := func(method, path, query, body string) func(*testing.T, []byte) {
		return func(t *testing.T, got []byte) {
			r := decode[echo.Response](t, got)
			want := echo.Response{
				Service: "ledger", Unit: "us-east-1", Region: "us-east",
				Method: method, Path: path, Query: query,
				Host: strings.TrimPrefix(srv.URL, "http://"), Proto: "HTTP/1.1",
				BodyBytes: int64(len(body)), BodySHA256: sum([]byte(body)),
				Trailers: http.Header{},
			}
			r.Headers = nil
			if diff := cmp.Diff(want, r); diff != "" {
				t.Errorf("echo answer (-want +got):\n%s", diff)
			}
		}
	}
	statusJSON := func(code int) func(*testing.T, []byte) {
		return func(t *testing.T, got []byte) {
			want := echo.StatusResponse{Status: code, Service: "ledger", Unit: "us-east-1", Region: "us-east"}
			if diff := cmp.Diff(want, decode[echo.StatusResponse](t, got)); diff != "" {
				t.Errorf("status answer (-want +got):\n%s", diff)
			}
		}
	}
	const (
		typeJSON  = "application/json"
		typeText  = "text/plain; charset=utf-8"
		typeOctet = "application/octet-stream"
	)

	tests := []struct {
		name         string
		method       string // GET when empty
		target       string
		header       http.Header
		body         string
		wantCode     int
		wantType     string
		wantBody     string // exact, when set
		wantContains string // substring, when set
		check        func(*testing.T, []byte)
	}{
		{name: "root", target: "/", wantCode: 200, wantType: typeJSON, check: echoed("GET", "/", "", "")},
		{name: "other_path_post", method: "POST", target: "/a/b?x=1&x=2", body: "hello",
			wantCode: 200, wantType: typeJSON, check: echoed("POST", "/a/b", "x=1&x=2", "hello")},
		{name: "unclean_path_not_redirected", target: "/a/../b//c", wantCode: 200, wantType: typeJSON,
			check: echoed("GET", "/a/../b//c", "", "")},
		{name: "put_under_bytes_prefix", method: "PUT", target: "/bytes/x", body: "x",
			wantCode: 200, wantType: typeJSON, check: echoed("PUT", "/bytes/x", "", "x")},
		{name: "small", method: "POST", target: "/anything", header: http.Header{"X-Echo-Small": {"1"}}, body: "ignored",
			wantCode: 200, wantType: typeText, wantBody: "unit=us-east-1 region=us-east\n"},
		{name: "small_other_value_is_json", target: "/", header: http.Header{"X-Echo-Small": {"0"}},
			wantCode: 200, wantType: typeJSON, check: echoed("GET", "/", "", "")},

		{name: "healthz", target: "/healthz", wantCode: 200, wantType: typeText, wantBody: "ok"},

		{name: "bytes", target: "/bytes?n=300", wantCode: 200, wantType: typeOctet, wantBody: string(patternBytes(300))},
		{name: "bytes_zero", target: "/bytes?n=0", wantCode: 200, wantType: typeOctet, wantBody: ""},
		{name: "bytes_head", method: "HEAD", target: "/bytes?n=10", wantCode: 200, wantType: typeOctet, wantBody: ""},
		{name: "bytes_missing_n", target: "/bytes", wantCode: 400, wantType: typeText, wantContains: "needs n"},
		{name: "bytes_not_a_number", target: "/bytes?n=ten", wantCode: 400, wantType: typeText, wantContains: `bad n "ten"`},
		{name: "bytes_negative", target: "/bytes?n=-1", wantCode: 400, wantType: typeText, wantContains: `bad n "-1"`},
		{name: "bytes_over_max", target: "/bytes?n=1099511627777", wantCode: 400, wantType: typeText, wantContains: "from 0 to 1099511627776"},
		{name: "bytes_post", method: "POST", target: "/bytes?n=1", wantCode: 405, wantType: typeText, wantContains: "GET or HEAD"},

		{name: "delay_zero", method: "POST", target: "/delay?ms=0", body: "b",
			wantCode: 200, wantType: typeJSON, check: echoed("POST", "/delay", "ms=0", "b")},
		{name: "delay_short", target: "/delay?ms=5", wantCode: 200, wantType: typeJSON, check: echoed("GET", "/delay", "ms=5", "")},
		{name: "delay_small", target: "/delay?ms=1", header: http.Header{"X-Echo-Small": {"1"}},
			wantCode: 200, wantType: typeText, wantBody: "unit=us-east-1 region=us-east\n"},
		{name: "delay_missing_ms", target: "/delay", wantCode: 400, wantType: typeText, wantContains: `bad ms ""`},
		{name: "delay_not_a_number", target: "/delay?ms=1s", wantCode: 400, wantType: typeText, wantContains: `bad ms "1s"`},
		{name: "delay_negative", target: "/delay?ms=-5", wantCode: 400, wantType: typeText, wantContains: `bad ms "-5"`},
		{name: "delay_over_max", target: "/delay?ms=60001", wantCode: 400, wantType: typeText, wantContains: "from 0 to 60000"},

		{name: "status_200", target: "/status/200", wantCode: 200, wantType: typeJSON, check: statusJSON(200)},
		{name: "status_503", method: "POST", target: "/status/503", body: "x", wantCode: 503, wantType: typeJSON, check: statusJSON(503)},
		{name: "status_599", target: "/status/599", wantCode: 599, wantType: typeJSON, check: statusJSON(599)},
		{name: "status_204_no_body", target: "/status/204", wantCode: 204, wantBody: ""},
		{name: "status_304_no_body", target: "/status/304", wantCode: 304, wantBody: ""},
		{name: "status_1xx", target: "/status/100", wantCode: 400, wantType: typeText, wantContains: "1xx"},
		{name: "status_199", target: "/status/199", wantCode: 400, wantType: typeText, wantContains: `bad status code "199"`},
		{name: "status_600", target: "/status/600", wantCode: 400, wantType: typeText, wantContains: `bad status code "600"`},
		{name: "status_99", target: "/status/99", wantCode: 400, wantType: typeText, wantContains: "bad status code"},
		{name: "status_leading_zero", target: "/status/0200", wantCode: 400, wantType: typeText, wantContains: "bad status code"},
		{name: "status_plus", target: "/status/+20", wantCode: 400, wantType: typeText, wantContains: "bad status code"},
		{name: "status_word", target: "/status/ok", wantCode: 400, wantType: typeText, wantContains: "bad status code"},
		{name: "status_empty", target: "/status/", wantCode: 400, wantType: typeText, wantContains: "bad status code"},
		{name: "status_nested", target: "/status/200/x", wantCode: 400, wantType: typeText, wantContains: "bad status code"},

		{name: "metrics", target: "/metrics", wantCode: 200, wantContains: "cellmesh_echo_requests_total"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodGet
			}
			var body io.Reader
			if tt.body != "" {
				body = strings.NewReader(tt.body)
			}
			req, err := http.NewRequestWithContext(t.Context(), method, srv.URL+tt.target, body)
			if err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.header {
				req.Header[k] = v
			}
			resp, got := do(t, client, req)
			if resp.StatusCode != tt.wantCode {
				t.Errorf("status = %d, want %d (body %q)", resp.StatusCode, tt.wantCode, got)
			}
			if tt.wantType != "" && resp.Header.Get("Content-Type") != tt.wantType {
				t.Errorf("Content-Type = %q, want %q", resp.Header.Get("Content-Type"), tt.wantType)
			}
			for k, v := range map[string]string{echo.HeaderService: "ledger", echo.HeaderUnit: "us-east-1", echo.HeaderRegion: "us-east"} {
				if got := resp.Header.Get(k); got != v {
					t.Errorf("%s = %q, want %q", k, got, v)
				}
			}
			if tt.check == nil && tt.wantContains == "" && string(got) != tt.wantBody {
				t.Errorf("body = %q, want %q", got, tt.wantBody)
			}
			if tt.wantContains != "" && !bytes.Contains(got, []byte(tt.wantContains)) {
				t.Errorf("body = %q, want it to contain %q", got, tt.wantContains)
			}
			if tt.check != nil {
				tt.check(t, got)
			}
		})
	}
}

func TestEchoReportsRequest(t *testing.T) {
	srv := newServer(t, echo.Handler(testInfo, nil))
	for name, client := range clients(t) {
		t.Run(name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(t.Context(), "PATCH", srv.URL+"/v1/users/7?a=b%20c&a=d", strings.NewReader("<payload & more>"))
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "ledger.internal"
			req.Header.Set("x-cellmesh-uid", "2088123456789")
			req.Header.Add("x-cellmesh-shadow", "1")
			req.Header.Add("x-multi", "one")
			req.Header.Add("x-multi", "two")
			req.Header.Set("x-note", "a<b&c")
			resp, body := do(t, client, req)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status = %d, body %q", resp.StatusCode, body)
			}
			got := decode[echo.Response](t, body)
			proto := map[string]string{"http1": "HTTP/1.1", "h2c": "HTTP/2.0"}[name]
			if resp.Proto != proto {
				t.Errorf("response proto = %q, want %q", resp.Proto, proto)
			}
			want := echo.Response{
				Service: "ledger", Unit: "us-east-1", Region: "us-east",
				Method: "PATCH", Path: "/v1/users/7", Query: "a=b%20c&a=d",
				Host: "ledger.internal", Proto: proto,
				Headers: http.Header{
					"X-Cellmesh-Uid":    {"2088123456789"},
					"X-Cellmesh-Shadow": {"1"},
					"X-Multi":           {"one", "two"},
					"X-Note":            {"a<b&c"},
					"Content-Length":    {"16"},
				},
				BodyBytes: 16, BodySHA256: sum([]byte("<payload & more>")),
				Trailers: http.Header{},
			}
			// The client adds headers of its own (User-Agent); compare the ones sent here.
			for k := range got.Headers {
				if _, ok := want.Headers[k]; !ok {
					delete(got.Headers, k)
				}
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("echo answer (-want +got):\n%s", diff)
			}
			if !bytes.Contains(body, []byte(`"a<b&c"`)) {
				t.Errorf("header value escaped for HTML in %s", body)
			}
		})
	}
}

// blockReader endlessly repeats a block of random bytes.
type blockReader struct {
	block []byte
	off   int
}

func (r *blockReader) Read(p []byte) (int, error) {
	n := copy(p, r.block[r.off:])
	r.off = (r.off + n) % len(r.block)
	return n, nil
}

func TestUploadStreams(t *testing.T) {
	const size = 64 << 20
	block := make([]byte, 1<<20+7)
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	for i := range block {
		block[i] = byte(rng.Uint32())
	}
	reg := prometheus.NewRegistry()
	srv := newServer(t, echo.Handler(testInfo, reg))
	var uploaded int64
	for name, client := range clients(t) {
		t.Run(name, func(t *testing.T) {
			h := sha256.New()
			body := io.TeeReader(io.LimitReader(&blockReader{block: block}, size), h)
			req, err := http.NewRequestWithContext(t.Context(), "PUT", srv.URL+"/upload", io.NopCloser(body))
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = -1 // streamed, length unknown up front

			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			resp, got := do(t, client, req)
			runtime.ReadMemStats(&after)

			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status = %d, body %q", resp.StatusCode, got)
			}
			r := decode[echo.Response](t, got)
			if r.BodyBytes != size {
				t.Errorf("body_bytes = %d, want %d", r.BodyBytes, size)
			}
			if want := hex.EncodeToString(h.Sum(nil)); r.BodySHA256 != want {
				t.Errorf("body_sha256 = %s, want %s", r.BodySHA256, want)
			}
			// Client and server together allocate about 3 MiB, more under -race,
			// where sync.Pool drops items; buffering the body whole takes 64 MiB.
			if alloc := after.TotalAlloc - before.TotalAlloc; alloc > size/2 {
				t.Errorf("uploading %d MiB allocated %d MiB; the body is buffered somewhere", size>>20, alloc>>20)
			}
			uploaded += size
		})
	}
	want := fmt.Sprintf(`
# HELP cellmesh_echo_request_body_bytes_total Request body bytes read by the echo service.
# TYPE cellmesh_echo_request_body_bytes_total counter
cellmesh_echo_request_body_bytes_total %d
`, uploaded)
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "cellmesh_echo_request_body_bytes_total"); err != nil {
		t.Error(err)
	}
}

func TestBytesTrailer(t *testing.T) {
	srv := newServer(t, echo.Handler(testInfo, nil))
	for name, client := range clients(t) {
		for _, n := range []int{0, 1, echo.ChunkSize, 3*echo.ChunkSize + 17, 4<<20 + 12345} {
			t.Run(fmt.Sprintf("%s/n=%d", name, n), func(t *testing.T) {
				req, err := http.NewRequestWithContext(t.Context(), "GET", srv.URL+"/bytes?n="+strconv.Itoa(n), nil)
				if err != nil {
					t.Fatal(err)
				}
				resp, body := do(t, client, req)
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status = %d, body %q", resp.StatusCode, body)
				}
				if got := resp.Header.Get("Content-Type"); got != "application/octet-stream" {
					t.Errorf("Content-Type = %q", got)
				}
				if len(body) != n {
					t.Fatalf("got %d bytes, want %d", len(body), n)
				}
				if !bytes.Equal(body, patternBytes(n)) {
					t.Errorf("body does not follow PatternByte")
				}
				if got, want := resp.Trailer.Get(echo.TrailerSHA256), sum(body); got != want {
					t.Errorf("trailer %s = %q, want %q (sha256 of the body received)", echo.TrailerSHA256, got, want)
				}
			})
		}
	}
}

func TestTrailersReported(t *testing.T) {
	srv := newServer(t, echo.Handler(testInfo, nil))
	for name, client := range clients(t) {
		t.Run(name, func(t *testing.T) {
			req, err := http.NewRequestWithContext(t.Context(), "POST", srv.URL+"/", io.NopCloser(strings.NewReader("payload")))
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = -1
			req.Trailer = http.Header{
				"X-Checksum":       {"abc123"},
				"X-Multi":          {"a", "b"},
				"X-Declared-Empty": nil, // declared, never sent
			}
			resp, body := do(t, client, req)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status = %d, body %q", resp.StatusCode, body)
			}
			got := decode[echo.Response](t, body)
			want := http.Header{"X-Checksum": {"abc123"}, "X-Multi": {"a", "b"}}
			if diff := cmp.Diff(want, got.Trailers); diff != "" {
				t.Errorf("trailers (-want +got):\n%s", diff)
			}
			if got.BodyBytes != 7 || got.BodySHA256 != sum([]byte("payload")) {
				t.Errorf("body_bytes = %d, body_sha256 = %s; want 7 and the sha256 of %q", got.BodyBytes, got.BodySHA256, "payload")
			}
		})
	}
}

func TestH2C(t *testing.T) {
	srv := newServer(t, echo.Handler(testInfo, nil))
	client := clients(t)["h2c"]
	for _, target := range []string{"/", "/bytes?n=100", "/status/503", "/healthz"} {
		req, err := http.NewRequestWithContext(t.Context(), "GET", srv.URL+target, nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, body := do(t, client, req)
		if resp.ProtoMajor != 2 {
			t.Errorf("GET %s: proto = %s, want HTTP/2.0", target, resp.Proto)
		}
		if resp.Header.Get(echo.HeaderUnit) != "us-east-1" {
			t.Errorf("GET %s: %s = %q (body %q)", target, echo.HeaderUnit, resp.Header.Get(echo.HeaderUnit), body)
		}
	}
}

func TestDelay(t *testing.T) {
	h := echo.Handler(testInfo, nil)
	t.Run("waits", func(t *testing.T) {
		start := time.Now()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), "GET", "/delay?ms=30", nil))
		if elapsed := time.Since(start); elapsed < 30*time.Millisecond {
			t.Errorf("answered after %v, want at least 30ms", elapsed)
		}
		if rec.Code != http.StatusOK {
			t.Errorf("status = %d, want 200", rec.Code)
		}
	})
	t.Run("ends_with_request_context", func(t *testing.T) {
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		start := time.Now()
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequestWithContext(ctx, "GET", "/delay?ms=60000", nil))
		if elapsed := time.Since(start); elapsed > 10*time.Second {
			t.Errorf("answered after %v; the ended context was not noticed", elapsed)
		}
		if rec.Code != http.StatusOK {
			t.Errorf("status = %d, want 200", rec.Code)
		}
		if r := decode[echo.Response](t, rec.Body.Bytes()); r.Path != "/delay" || r.Query != "ms=60000" {
			t.Errorf("answer path %q query %q, want /delay and ms=60000", r.Path, r.Query)
		}
	})
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	// Two handlers on one registry share the counters instead of failing.
	h1 := echo.Handler(testInfo, reg)
	h2 := echo.Handler(echo.Info{Service: "ledger", Unit: "eu-west-1", Region: "eu-west"}, reg)
	requests := []struct {
		h      http.Handler
		method string
		target string
		body   string
	}{
		{h1, "POST", "/", "hello"},
		{h2, "POST", "/x", "abc"},
		{h1, "GET", "/status/503", ""},
		{h1, "GET", "/bytes?n=x", ""},
		{h2, "GET", "/bytes?n=1", ""},
		{h1, "GET", "/healthz", ""},
		{h1, "GET", "/metrics", ""},
	}
	for _, r := range requests {
		rec := httptest.NewRecorder()
		r.h.ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), r.method, r.target, strings.NewReader(r.body)))
	}
	const want = `
# HELP cellmesh_echo_request_body_bytes_total Request body bytes read by the echo service.
# TYPE cellmesh_echo_request_body_bytes_total counter
cellmesh_echo_request_body_bytes_total 8
# HELP cellmesh_echo_requests_total Requests answered by the echo service, by status code.
# TYPE cellmesh_echo_requests_total counter
cellmesh_echo_requests_total{code="200"} 5
cellmesh_echo_requests_total{code="400"} 1
cellmesh_echo_requests_total{code="503"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s: %s", p.Metric, p.Text)
	}
}

func TestMetricsNeedGatherer(t *testing.T) {
	tests := []struct {
		name string
		reg  prometheus.Registerer
	}{
		{"nil", nil},
		{"registerer_only", prometheus.WrapRegistererWith(prometheus.Labels{"unit": "us-east-1"}, prometheus.NewRegistry())},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			echo.Handler(testInfo, tt.reg).ServeHTTP(rec, httptest.NewRequestWithContext(t.Context(), "GET", "/metrics", nil))
			if rec.Code != http.StatusNotFound {
				t.Errorf("status = %d, want 404", rec.Code)
			}
		})
	}
}

// FuzzParams checks that any n, ms or status code is answered as documented.
func FuzzParams(f *testing.F) {
	for _, s := range []string{"0", "200", "599", "600", "100", "-1", "+1", "1099511627776", "1099511627777", "0x10", " 1", "60000", "60001", "ok", ""} {
		f.Add(s)
	}
	h := echo.Handler(testInfo, nil)
	ended, cancel := context.WithCancel(context.Background())
	cancel()
	f.Fuzz(func(t *testing.T, s string) {
		rec := httptest.NewRecorder()
		req := httptest.NewRequestWithContext(ended, "HEAD", "/bytes", nil)
		req.URL.RawQuery = url.Values{"n": {s}}.Encode()
		h.ServeHTTP(rec, req)
		n, err := strconv.ParseInt(s, 10, 64)
		if ok := err == nil && n >= 0 && n <= echo.MaxBytes; (rec.Code == http.StatusOK) != ok || (!ok && rec.Code != http.StatusBadRequest) {
			t.Errorf("/bytes?n=%q: status %d", s, rec.Code)
		}

		rec = httptest.NewRecorder()
		req = httptest.NewRequestWithContext(ended, "GET", "/delay", nil)
		req.URL.RawQuery = url.Values{"ms": {s}}.Encode()
		h.ServeHTTP(rec, req)
		if ok := err == nil && n >= 0 && n <= 60000; (rec.Code == http.StatusOK) != ok || (!ok && rec.Code != http.StatusBadRequest) {
			t.Errorf("/delay?ms=%q: status %d", s, rec.Code)
		}

		rec = httptest.NewRecorder()
		req = httptest.NewRequestWithContext(ended, "GET", "/", nil)
		req.URL.Path = "/status/" + s
		h.ServeHTTP(rec, req)
		want := http.StatusBadRequest
		if code, err := strconv.Atoi(s); err == nil && len(s) == 3 && code >= 200 && code <= 599 {
			want = code
		}
		if rec.Code != want {
			t.Errorf("/status/%q: status %d, want %d", s, rec.Code, want)
		}
	})
}

func BenchmarkHandler(b *testing.B) {
	h := echo.Handler(testInfo, prometheus.NewRegistry())
	for _, bb := range []struct {
		name   string
		header http.Header
	}{
		{"small", http.Header{"X-Echo-Small": {"1"}}},
		{"json", http.Header{"X-Cellmesh-Uid": {"2088123456789"}, "User-Agent": {"bench"}}},
	} {
		b.Run(bb.name, func(b *testing.B) {
			req := httptest.NewRequest("GET", "/v1/users/7", nil)
			req.Header = bb.header
			w := &discardWriter{h: http.Header{}}
			b.ReportAllocs()
			for b.Loop() {
				clear(w.h)
				h.ServeHTTP(w, req)
			}
		})
	}
}

type discardWriter struct{ h http.Header }

func (w *discardWriter) Header() http.Header         { return w.h }
func (w *discardWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *discardWriter) WriteHeader(int)             {}

// TestBinary builds cmd/echo, runs it on a free port, asks it once over
// HTTP/1.1 and h2c, and stops it with SIGTERM.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the echo binary; skipped under -short")
	}
	if runtime.GOOS == "windows" {
		t.Skip("stops the binary with SIGTERM")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skipf("no go command to build with: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "echo")
	buildCtx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(buildCtx, goBin, "build", "-o", bin, "./cmd/echo").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}

	cmd := exec.Command(bin, "--listen", "127.0.0.1:0", "--unit", "us-east-1", "--region", "us-east")
	logs := newLogWriter()
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	waited := false
	t.Cleanup(func() {
		if !waited {
			_ = cmd.Process.Kill()
			<-exited
		}
	})

	var addr string
	select {
	case addr = <-logs.addr:
	case err := <-exited:
		waited = true
		t.Fatalf("echo exited before listening: %v\n%s", err, logs)
	case <-time.After(30 * time.Second):
		t.Fatalf("no listening line within 30s:\n%s", logs)
	}

	for name, client := range clients(t) {
		req, err := http.NewRequestWithContext(t.Context(), "GET", "http://"+addr+"/hello", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp, body := do(t, client, req)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: status = %d, body %q", name, resp.StatusCode, body)
		}
		got := decode[echo.Response](t, body)
		if got.Service != "echo" || got.Unit != "us-east-1" || got.Region != "us-east" || got.Path != "/hello" {
			t.Errorf("%s: answer %+v, want service echo, unit us-east-1, region us-east, path /hello", name, got)
		}
		client.CloseIdleConnections()
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		waited = true
		if err != nil {
			t.Fatalf("echo exited with %v, want 0\n%s", err, logs)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("echo still running 20s after SIGTERM\n%s", logs)
	}
	if !strings.Contains(logs.String(), "msg=stopped") {
		t.Errorf("no stopped line in the log:\n%s", logs)
	}
}

// logWriter collects a process's stderr and sends the address of its
// "listening addr=" line once.
type logWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	addr chan string
	sent bool
}

var listeningRE = regexp.MustCompile(`listening addr=(\S+)\s`)

func newLogWriter() *logWriter { return &logWriter{addr: make(chan string, 1)} }

func (w *logWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.sent {
		if m := listeningRE.FindSubmatch(w.buf.Bytes()); m != nil {
			w.sent = true
			w.addr <- string(m[1])
		}
	}
	return len(p), nil
}

func (w *logWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
