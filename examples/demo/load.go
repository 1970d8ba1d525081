package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// load plays users: each request enters the mesh through a random unit's
// sidecar, for a random user; half are balance reads, a quarter deposits,
// a quarter transfers to another user. A request is retried (a write with
// its idempotency key) for up to 5 s while the answer says to retry: 503
// (a unit failing over, a shard draining: Retry-After) or the ledger's 409
// (the shard's epoch moved on: the sidecar's next map sends the retry to
// the new owner), as the ledger's README tells its clients; what fails
// then is a client-visible error.
type load struct {
	d        *Demo
	users    int
	rate     int
	client   *http.Client
	seq      atomic.Int64
	requests atomic.Int64
	reads    atomic.Int64
	writes   atomic.Int64
	acked    atomic.Int64
	errors   atomic.Int64
	mu       sync.Mutex
	kinds    map[string]int64
	byUnit   map[string]int64
}

func newLoad(d *Demo, users, rate int) *load {
	return &load{d: d, users: users, rate: rate, client: &http.Client{Timeout: 10 * time.Second},
		kinds: map[string]int64{}, byUnit: map[string]int64{}}
}

// workers bounds the requests in flight.
const workers = 16

// run sends requests at the rate until ctx ends, with a progress line
// every every.
func (g *load) run(ctx context.Context, progress io.Writer, every time.Duration) {
	tokens := make(chan struct{}, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for {
				select {
				case <-ctx.Done():
					return
				case <-tokens:
					g.one(ctx, r)
				}
			}
		}()
	}
	fmt.Fprintf(progress, "load: %d users, %d requests/s through every unit's sidecar (reads, deposits, transfers)\n", g.users, g.rate)
	tick := time.NewTicker(time.Second / time.Duration(g.rate))
	defer tick.Stop()
	report := time.NewTicker(every)
	defer report.Stop()
	start := time.Now()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			fmt.Fprintf(progress, "load: %s\n", g.line(time.Since(start)))
			return
		case <-report.C:
			fmt.Fprintf(progress, "load: %s\n", g.line(time.Since(start)))
		case <-tick.C:
			select {
			case tokens <- struct{}{}:
			default: // every worker busy: the mesh is slower than the rate
			}
		}
	}
}

func (g *load) line(elapsed time.Duration) string {
	n := g.requests.Load()
	return fmt.Sprintf("%s: %d requests (%.0f/s), %d writes acknowledged, %d client-visible errors",
		elapsed.Round(time.Second), n, float64(n)/max(elapsed.Seconds(), 1), g.acked.Load(), g.errors.Load())
}

func (g *load) user(r *rand.Rand) string {
	return strconv.Itoa(2088000000000 + 1 + r.IntN(g.users))
}

// one sends one operation.
func (g *load) one(ctx context.Context, r *rand.Rand) {
	units := g.d.report.Units
	u := units[r.IntN(len(units))]
	uid := g.user(r)
	g.requests.Add(1)
	g.mu.Lock()
	g.byUnit[u.Name]++
	g.mu.Unlock()
	method, path, body, key := "GET", "/accounts/"+uid, "", ""
	switch n := r.IntN(4); {
	case n < 2:
		g.reads.Add(1)
	default:
		g.writes.Add(1)
		method, path, body = "POST", "/accounts/"+uid+"/deposit", fmt.Sprintf(`{"amount":%d}`, 1+r.IntN(100))
		if n == 3 {
			to := g.user(r)
			for to == uid {
				to = g.user(r)
			}
			path, body = "/accounts/"+uid+"/transfer", fmt.Sprintf(`{"to":%q,"amount":%d}`, to, 1+r.IntN(50))
		}
		key = fmt.Sprintf("demo-%d", g.seq.Add(1))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, kind := g.send(ctx, u, method, path, uid, key, body)
		switch {
		case ok:
			if method == "POST" {
				g.acked.Add(1)
			}
			return
		case kind == "":
			return // the run ended with the request in flight: neither
		case !retryable(kind) || time.Now().After(deadline):
			g.failed(method + " " + kind)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retryable says whether an answer tells the client to retry.
func retryable(kind string) bool {
	return strings.HasPrefix(kind, "503 ") || kind == "409 ledger"
}

// send sends one request through unit u and reports whether it was
// answered 200; if not, what failed: the status and the sidecar's error
// kind ("" when the run ended first).
func (g *load) send(ctx context.Context, u Unit, method, path, uid, key, body string) (bool, string) {
	req, _ := http.NewRequestWithContext(ctx, method, "http://"+u.Outbound+path, strings.NewReader(body))
	req.Host = "ledger"
	req.Header.Set("x-cellmesh-uid", uid)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return false, "" // the run ended: not the mesh's failure
		}
		return false, "transport"
	}
	defer resp.Body.Close()
	var out map[string]any
	if resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&out) == nil {
		return true, ""
	}
	kind := resp.Header.Get("x-cellmesh-error")
	if kind == "" {
		kind = "ledger"
	}
	return false, fmt.Sprintf("%d %s", resp.StatusCode, kind)
}

func (g *load) failed(kind string) {
	g.errors.Add(1)
	g.mu.Lock()
	g.kinds[kind]++
	g.mu.Unlock()
}

func (g *load) result() Load {
	g.mu.Lock()
	defer g.mu.Unlock()
	l := Load{Users: g.users, Requests: g.requests.Load(), Reads: g.reads.Load(), Writes: g.writes.Load(),
		WritesAcked: g.acked.Load(), ClientErrors: g.errors.Load(), ErrorKinds: map[string]int64{}, ByUnit: map[string]int64{}}
	for k, v := range g.kinds {
		l.ErrorKinds[k] = v
	}
	for k, v := range g.byUnit {
		l.ByUnit[k] = v
	}
	return l
}
