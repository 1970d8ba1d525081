// Command loadgen is an open-loop HTTP/1.1 load generator for the sidecar
// benchmarks (bench/sidecar.sh).
//
//	loadgen --url http://127.0.0.1:15001/hello --host echo \
//	        --header 'x-cellmesh-uid: 2088000000010' --header 'x-echo-small: 1' \
//	        --rate 1000 --duration 10s --conns 16 --warmup 2s
//
// Requests are sent on a fixed schedule, one every 1/rate seconds, whatever
// the answers do: request i is due at start + i/rate. Each of --conns
// keep-alive connections takes the next due request when it is free, so a
// slow answer delays the requests queued behind it, and each latency is
// counted from the request's scheduled time, not from when it was written.
// A stall therefore shows in the percentiles instead of being hidden by a
// generator that waited for it (coordinated omission).
//
// It prints one line of key=value pairs (times in milliseconds):
//
//	rate=1000 duration_s=10.00 sent=10000 ok=10000 errors=0 missed=0 rps=999.9
//	p50_ms=0.110 p90_ms=... p99_ms=... p999_ms=... max_ms=... lag_p99_ms=...
//
// rps counts the answers that completed within the measured window; errors
// are failed or non-2xx answers; missed are requests still queued when the
// run ended (the target could not keep up). lag_p99_ms is how late the
// generator itself wrote the requests (write time minus scheduled time; a
// high value with idle connections means the generator was starved of CPU).
// The first error of each kind is printed on stderr.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

type headers []string

func (h *headers) String() string     { return strings.Join(*h, ", ") }
func (h *headers) Set(v string) error { *h = append(*h, v); return nil }

type options struct {
	url      *url.URL
	host     string
	headers  []string
	rate     float64
	duration time.Duration
	warmup   time.Duration
	conns    int
	timeout  time.Duration
	method   string
}

func main() {
	o, err := parse(os.Args[1:])
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	res, err := run(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
	fmt.Println(res)
}

func parse(args []string) (options, error) {
	var o options
	var hs headers
	var rawURL string
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.StringVar(&rawURL, "url", "", "`URL` to send to (http only), e.g. http://127.0.0.1:15001/hello")
	fs.StringVar(&o.host, "host", "", "Host header (default: the URL's host)")
	fs.Var(&hs, "header", "`'name: value'` request header; repeat for more")
	fs.Float64Var(&o.rate, "rate", 1000, "requests per second, on a fixed schedule")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured time")
	fs.DurationVar(&o.warmup, "warmup", 2*time.Second, "time sent at the same rate before measuring (not counted)")
	fs.IntVar(&o.conns, "conns", 16, "keep-alive connections")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Second, "per-request timeout, from the write")
	fs.StringVar(&o.method, "method", "GET", "request method (no body is sent)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	var problems []string
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Sprintf("unexpected arguments %q", fs.Args()))
	}
	u, err := url.Parse(rawURL)
	switch {
	case rawURL == "":
		problems = append(problems, "--url is required")
	case err != nil:
		problems = append(problems, fmt.Sprintf("--url: %v", err))
	case u.Scheme != "http" || u.Host == "":
		problems = append(problems, fmt.Sprintf("--url %q: want http://host:port/path", rawURL))
	}
	o.url = u
	for _, h := range hs {
		name, value, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(name) == "" || strings.ContainsAny(h, "\r\n") {
			problems = append(problems, fmt.Sprintf("--header %q: want 'name: value'", h))
			continue
		}
		o.headers = append(o.headers, strings.TrimSpace(name)+": "+strings.TrimSpace(value))
	}
	if o.rate <= 0 || o.rate > 1e6 {
		problems = append(problems, "--rate: want 0 < rate <= 1000000")
	}
	if o.duration <= 0 {
		problems = append(problems, "--duration must be positive")
	}
	if o.warmup < 0 {
		problems = append(problems, "--warmup must not be negative")
	}
	if o.conns < 1 || o.conns > 10000 {
		problems = append(problems, "--conns: want 1..10000")
	}
	if o.timeout <= 0 {
		problems = append(problems, "--timeout must be positive")
	}
	if len(problems) > 0 {
		return o, errors.New(strings.Join(problems, "; "))
	}
	return o, nil
}

// request builds the bytes of the one request sent over and over.
func (o options) request() []byte {
	host := o.host
	if host == "" {
		host = o.url.Host
	}
	path := o.url.RequestURI()
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", o.method, path, host)
	for _, h := range o.headers {
		b.WriteString(h)
		b.WriteString("\r\n")
	}
	b.WriteString("\r\n")
	return []byte(b.String())
}

// sample is one measured request.
type sample struct {
	latency time.Duration // answer read - scheduled
	lag     time.Duration // write - scheduled
}

type worker struct {
	o      *options
	req    []byte
	addr   string
	conn   net.Conn
	br     *bufio.Reader
	out    []sample
	errors int
	ok     int
	firstE map[string]bool
}

// result is what run returns, printed as key=value.
type result struct {
	rate                             float64
	window                           time.Duration
	sent, ok, errors, missed         int
	p50, p90, p99, p999, max, lagP99 time.Duration
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3f", float64(d)/float64(time.Millisecond)) }

func (r result) String() string {
	return fmt.Sprintf("rate=%g duration_s=%.2f sent=%d ok=%d errors=%d missed=%d rps=%.1f p50_ms=%s p90_ms=%s p99_ms=%s p999_ms=%s max_ms=%s lag_p99_ms=%s",
		r.rate, r.window.Seconds(), r.sent, r.ok, r.errors, r.missed, float64(r.ok)/r.window.Seconds(),
		ms(r.p50), ms(r.p90), ms(r.p99), ms(r.p999), ms(r.max), ms(r.lagP99))
}

func run(o options) (result, error) {
	interval := time.Duration(float64(time.Second) / o.rate)
	if interval <= 0 {
		interval = 1
	}
	warm := int64(o.warmup / interval)
	total := warm + int64(o.duration/interval)
	req := o.request()

	ws := make([]*worker, o.conns)
	for i := range ws {
		ws[i] = &worker{o: &o, req: req, addr: o.url.Host, firstE: map[string]bool{}}
		if err := ws[i].dial(); err != nil {
			return result{}, fmt.Errorf("connect to %s: %w", o.url.Host, err)
		}
	}
	var errMu sync.Mutex
	report := func(w *worker, kind string, err error) {
		errMu.Lock()
		defer errMu.Unlock()
		if !w.firstE[kind] {
			w.firstE[kind] = true
			fmt.Fprintf(os.Stderr, "loadgen: %s: %v\n", kind, err)
		}
	}

	// The run ends when every request is answered, or at the schedule's
	// end plus the timeout: what is still queued then is missed.
	start := time.Now().Add(20 * time.Millisecond)
	measured := start.Add(time.Duration(warm) * interval)
	end := start.Add(time.Duration(total) * interval)
	hardStop := end.Add(o.timeout)
	// The pacer hands out the index of each request when it is due;
	// the channel holds every slot, so it never waits for the workers.
	due := make(chan int64, total)
	pacerErr := make(chan error, 1)
	go func() { pacerErr <- pace(start, interval, total, due) }()
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Go(func() {
			for i := range due {
				at := start.Add(time.Duration(i) * interval)
				if time.Now().After(hardStop) {
					continue // drained unanswered: counted as missed below
				}
				lat, lag, err := w.do(at)
				if i < warm {
					continue
				}
				if err != nil {
					w.errors++
					report(w, errKind(err), err)
					continue
				}
				w.ok++
				w.out = append(w.out, sample{latency: lat, lag: lag})
			}
		})
	}
	wg.Wait()
	if err := <-pacerErr; err != nil {
		return result{}, err
	}
	for _, w := range ws {
		if w.conn != nil {
			w.conn.Close()
		}
	}

	var r result
	r.rate = o.rate
	r.window = end.Sub(measured)
	// Answers that came after the window (queued behind a stall) still
	// count as answered; rps is answers over the measured window.
	var all []sample
	for _, w := range ws {
		r.ok += w.ok
		r.errors += w.errors
		all = append(all, w.out...)
	}
	r.sent = int(total - warm)
	r.missed = r.sent - r.ok - r.errors
	if r.missed < 0 {
		r.missed = 0
	}
	if len(all) > 0 {
		lat := make([]time.Duration, len(all))
		lag := make([]time.Duration, len(all))
		for i, s := range all {
			lat[i], lag[i] = s.latency, s.lag
		}
		slices.Sort(lat)
		slices.Sort(lag)
		q := func(xs []time.Duration, p float64) time.Duration {
			i := int(p*float64(len(xs))+0.5) - 1
			return xs[min(max(i, 0), len(xs)-1)]
		}
		r.p50, r.p90, r.p99, r.p999, r.max = q(lat, .50), q(lat, .90), q(lat, .99), q(lat, .999), lat[len(lat)-1]
		r.lagP99 = q(lag, .99)
	}
	return r, nil
}

func errKind(err error) string {
	var se statusError
	if errors.As(err, &se) {
		return fmt.Sprintf("status %d", int(se))
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout"
	}
	return "connection"
}

type statusError int

func (e statusError) Error() string {
	return fmt.Sprintf("answer %d %s", int(e), http.StatusText(int(e)))
}

func (w *worker) dial() error {
	c, err := net.DialTimeout("tcp", w.addr, w.o.timeout)
	if err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	w.conn, w.br = c, bufio.NewReaderSize(c, 16<<10)
	return nil
}

// do sends one request on the worker's connection (reconnecting when it
// was closed) and reads the whole answer.
func (w *worker) do(due time.Time) (lat, lag time.Duration, err error) {
	if w.conn == nil {
		if err := w.dial(); err != nil {
			return 0, 0, err
		}
	}
	sent := time.Now()
	lag = sent.Sub(due)
	w.conn.SetDeadline(sent.Add(w.o.timeout))
	if _, err := w.conn.Write(w.req); err != nil {
		w.drop()
		return 0, lag, err
	}
	resp, err := http.ReadResponse(w.br, nil)
	if err != nil {
		w.drop()
		return 0, lag, err
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	done := time.Now()
	if err != nil {
		w.drop()
		return 0, lag, err
	}
	if resp.Close {
		w.drop()
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return 0, lag, statusError(resp.StatusCode)
	}
	return done.Sub(due), lag, nil
}

func (w *worker) drop() {
	if w.conn != nil {
		w.conn.Close()
		w.conn, w.br = nil, nil
	}
}

// paceSleep is pace with the runtime's timers: portable, but up to a
// millisecond late on Linux.
func paceSleep(start time.Time, interval time.Duration, total int64, due chan<- int64) error {
	for i := int64(0); i < total; {
		if d := time.Until(start.Add(time.Duration(i) * interval)); d > 0 {
			time.Sleep(d)
		}
		for n := int64(time.Since(start)/interval) + 1; i < n && i < total; i++ {
			due <- i
		}
	}
	return nil
}
