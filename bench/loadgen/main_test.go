package main

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func opts(t *testing.T, url string, args ...string) options {
	t.Helper()
	o, err := parse(append([]string{"--url", url}, args...))
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func TestRunCountsEveryScheduledRequest(t *testing.T) {
	var hosts, hdr atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hosts.Store(r.Host)
		hdr.Store(r.Header.Get("X-Echo-Small"))
		w.Write([]byte("ok"))
	}))
	defer srv.Close()
	r, err := run(opts(t, srv.URL+"/hello", "--host", "echo", "--header", "x-echo-small: 1",
		"--rate", "2000", "--duration", "300ms", "--warmup", "50ms", "--conns", "4"))
	if err != nil {
		t.Fatal(err)
	}
	if r.sent != 600 || r.ok != 600 || r.errors != 0 || r.missed != 0 {
		t.Fatalf("sent %d ok %d errors %d missed %d, want 600 answered", r.sent, r.ok, r.errors, r.missed)
	}
	if r.p50 <= 0 || r.p50 > r.p99 || r.p99 > r.max {
		t.Fatalf("percentiles out of order: %s", r)
	}
	if hosts.Load() != "echo" || hdr.Load() != "1" {
		t.Fatalf("Host %v, x-echo-small %v: want echo and 1", hosts.Load(), hdr.Load())
	}
	if !strings.Contains(r.String(), "rps=") {
		t.Fatalf("no rps in %q", r)
	}
}

// A stall delays the requests queued behind it: an open-loop generator
// counts that wait, where a closed loop would not have sent them.
func TestRunCountsTheWaitBehindAStall(t *testing.T) {
	var n atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 10 {
			time.Sleep(200 * time.Millisecond)
		}
	}))
	defer srv.Close()
	r, err := run(opts(t, srv.URL, "--rate", "1000", "--duration", "400ms", "--warmup", "0s", "--conns", "1"))
	if err != nil {
		t.Fatal(err)
	}
	// About 200 requests were due during the stall and waited for it.
	if r.ok != 400 || r.p90 < 50*time.Millisecond {
		t.Fatalf("ok %d, p90 %s: want 400 answered and the stall in the p90 (%s)", r.ok, r.p90, r)
	}
}

func TestParseRefusesBadFlags(t *testing.T) {
	_, err := parse([]string{"--url", "https://x/", "--rate", "0", "--header", "nocolon", "--conns", "0"})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"--url", "--rate", "--header", "--conns"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
}
