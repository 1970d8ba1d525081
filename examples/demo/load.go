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
	books    map[string]*account // what each user's balance must be
}

// account is what the load knows a user's balance must be: the sum of
// its acknowledged writes, unless a write's outcome is unknown (no answer:
// it may or may not have happened).
type account struct {
	balance   int64
	uncertain bool
}

func newLoad(d *Demo, users, rate int) *load {
	return &load{d: d, users: users, rate: rate, client: &http.Client{Timeout: 10 * time.Second},
		kinds: map[string]int64{}, byUnit: map[string]int64{}, books: map[string]*account{}}
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
	var amount int64
	to := ""
	switch n := r.IntN(4); {
	case n < 2:
		g.reads.Add(1)
	default:
		g.writes.Add(1)
		amount = int64(1 + r.IntN(100))
		method, path, body = "POST", "/accounts/"+uid+"/deposit", fmt.Sprintf(`{"amount":%d}`, amount)
		if n == 3 {
			to = g.user(r)
			for to == uid {
				to = g.user(r)
			}
			amount = int64(1 + r.IntN(50))
			path, body = "/accounts/"+uid+"/transfer", fmt.Sprintf(`{"to":%q,"amount":%d}`, to, amount)
		}
		key = fmt.Sprintf("demo-%d", g.seq.Add(1))
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		ok, kind, out := g.send(ctx, u, method, path, uid, key, body)
		switch {
		case ok:
			if method == "POST" {
				g.acked.Add(1)
				g.book(uid, to, amount, out["ok"] == true, false)
			}
			return
		case kind == "":
			if method == "POST" {
				g.book(uid, to, amount, false, true) // in flight at the end
			}
			return
		case !retryable(kind) || time.Now().After(deadline):
			g.failed(method + " " + kind)
			if method == "POST" {
				g.book(uid, to, amount, false, true)
			}
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// book records a write's outcome: a deposit (to == "") or a transfer to
// to, applied (done), refused (neither: an insufficient-funds transfer)
// or unknown.
func (g *load) book(uid, to string, amount int64, done, unknown bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	acct := func(u string) *account {
		a := g.books[u]
		if a == nil {
			a = &account{}
			g.books[u] = a
		}
		return a
	}
	from := acct(uid)
	switch {
	case unknown:
		from.uncertain = true
		if to != "" {
			acct(to).uncertain = true
		}
	case !done && to == "":
		from.uncertain = true // a deposit acknowledged without ok: not expected
	case !done:
		acct(to) // the refused transfer's receiver is still checked
	case to == "":
		from.balance += amount
	default:
		from.balance -= amount
		acct(to).balance += amount
	}
}

// Check is the end-of-run check that no acknowledged write is lost: every
// user the load wrote to is read (linearizable) and its balance compared
// with the sum of its acknowledged writes.
type Check struct {
	Accounts   int      `json:"accounts"`
	Verified   int      `json:"verified"`
	Uncertain  int      `json:"uncertain"` // a write of unknown outcome: not compared
	Lost       int      `json:"mismatches"`
	Unreadable int      `json:"unreadable"`
	Examples   []string `json:"examples,omitempty"`
}

// check reads every account the load wrote to.
func (g *load) check(ctx context.Context) Check {
	g.mu.Lock()
	books := make(map[string]account, len(g.books))
	for u, a := range g.books {
		books[u] = *a
	}
	g.mu.Unlock()
	var c Check
	units := g.d.report.Units
	i := 0
	for uid, want := range books {
		c.Accounts++
		if want.uncertain {
			c.Uncertain++
			continue
		}
		u := units[i%len(units)]
		i++
		bal, err := g.balance(ctx, u, uid)
		switch {
		case err != nil:
			c.Unreadable++
			if len(c.Examples) < 5 {
				c.Examples = append(c.Examples, fmt.Sprintf("%s: %v", uid, err))
			}
		case bal != want.balance:
			c.Lost++
			if len(c.Examples) < 5 {
				c.Examples = append(c.Examples, fmt.Sprintf("%s: balance %d, its acknowledged writes sum to %d", uid, bal, want.balance))
			}
		default:
			c.Verified++
		}
	}
	return c
}

// balance reads a user's balance, linearizable, retrying for 5 s.
func (g *load) balance(ctx context.Context, u Unit, uid string) (int64, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+u.Outbound+"/accounts/"+uid, nil)
		req.Host = "ledger"
		req.Header.Set("x-cellmesh-uid", uid)
		req.Header.Set("x-cellmesh-consistency", "linearizable")
		resp, err := g.client.Do(req)
		if err == nil {
			var out struct {
				Balance int64 `json:"balance"`
			}
			ok := resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&out) == nil
			resp.Body.Close()
			if ok {
				return out.Balance, nil
			}
			err = fmt.Errorf("HTTP %d %s", resp.StatusCode, resp.Header.Get("x-cellmesh-error"))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return 0, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retryable says whether an answer tells the client to retry.
func retryable(kind string) bool {
	return strings.HasPrefix(kind, "503 ") || kind == "409 ledger"
}

// send sends one request through unit u and reports whether it was
// answered 200, with the answer; if not, what failed: the status and the
// sidecar's error kind ("" when the run ended first).
func (g *load) send(ctx context.Context, u Unit, method, path, uid, key, body string) (bool, string, map[string]any) {
	req, _ := http.NewRequestWithContext(ctx, method, "http://"+u.Outbound+path, strings.NewReader(body))
	req.Host = "ledger"
	req.Header.Set("x-cellmesh-uid", uid)
	if key != "" {
		req.Header.Set("Idempotency-Key", key)
	}
	resp, err := g.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return false, "", nil // the run ended: not the mesh's failure
		}
		return false, "transport", nil
	}
	defer resp.Body.Close()
	var out map[string]any
	if resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&out) == nil {
		return true, "", out
	}
	kind := resp.Header.Get("x-cellmesh-error")
	if kind == "" {
		kind = "ledger"
	}
	return false, fmt.Sprintf("%d %s", resp.StatusCode, kind), nil
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
