//lint:file-ignore SA1019 x/net/http2.Transport is kept (it is maintained, only marked deprecated in favour of net/http) because net/http's HTTP/2 client accepts only a *tls.Conn from DialTLSContext, and dialTLS must hand over bytes it read ahead to see a refused certificate.

package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/net/http2"
)

// upstream sends requests to peer sidecars: over HTTP/3 on one QUIC
// connection per peer, or over HTTP/2 on TLS for peers configured with the
// h2 transport. Both check the peer's certificate against the endpoint it
// was picked as: the unit and service of the endpoint, in the trust domain.
type upstream struct {
	s   *Sidecar
	udp *net.UDPConn
	qt  *quic.Transport
	h3  *http3.Transport
	h2  *http2.Transport
	// conns are the connections open to peers, to close those to a dead
	// one.
	conns peerConns
}

func newUpstream(s *Sidecar) *upstream {
	u := &upstream{s: s}
	t := s.cfg.Timeouts
	u.h3 = &http3.Transport{
		QUICConfig: &quic.Config{
			HandshakeIdleTimeout: t.Connect,
			MaxIdleTimeout:       t.Idle,
			KeepAlivePeriod:      t.Idle / 3,
		},
		Dial:                   u.dialQUIC,
		MaxResponseHeaderBytes: s.cfg.Limits.MaxHeaderBytes,
		DisableCompression:     true,
	}
	u.h2 = &http2.Transport{
		DialTLSContext:     u.dialTLS,
		IdleConnTimeout:    t.Idle,
		MaxHeaderListSize:  uint32(s.cfg.Limits.MaxHeaderBytes),
		DisableCompression: true,
		ReadIdleTimeout:    t.Idle / 3, // ping a quiet connection, as QUIC keep-alives do
		PingTimeout:        t.Connect,
	}
	return u
}

// open binds the UDP socket QUIC connections to peers use. resetKey lets
// a later run of this sidecar reset connections this one leaves open.
func (u *upstream) open(resetKey *quic.StatelessResetKey) error {
	udp, err := net.ListenUDP("udp", nil)
	if err != nil {
		return fmt.Errorf("open the UDP socket for QUIC to peers: %w", err)
	}
	u.udp, u.qt = udp, &quic.Transport{Conn: udp, StatelessResetKey: resetKey}
	return nil
}

func (u *upstream) close() {
	u.h3.Close()
	u.h2.CloseIdleConnections()
	if u.qt != nil {
		u.qt.Close()
		u.udp.Close()
	}
}

// dialError marks a failure to reach a peer before anything was sent, so
// the request may try another endpoint.
type dialError struct {
	ep  Endpoint
	err error
}

func (e *dialError) Error() string {
	return fmt.Sprintf("connect to %s in %s at %s over %s: %v", e.ep.Service, e.ep.Unit, e.ep.Address, e.ep.Transport, e.err)
}
func (e *dialError) Unwrap() error { return e.err }

func (u *upstream) tlsFor(ep *endpoint, proto string) *tls.Config {
	c := u.s.cfg.TLS.ClientConfig(func(peer meshtls.ID) error {
		if peer.Unit != ep.Unit || peer.Service != ep.Service {
			return fmt.Errorf("endpoint %s is listed as %s in %s, but its certificate says %s in %s",
				ep.Address, ep.Service, ep.Unit, peer.Service, peer.Unit)
		}
		if m := u.s.live.Load(); m != nil {
			if unit, ok := m.Unit(peer.Unit); ok && unit.Region != peer.Region {
				return fmt.Errorf("certificate places unit %s in region %s, the topology in %s", peer.Unit, peer.Region, unit.Region)
			}
		}
		return nil
	}, u.s.tlsRejected("outbound"))
	c.NextProtos = []string{proto}
	return c
}

func (u *upstream) dialQUIC(ctx context.Context, addr string, _ *tls.Config, qc *quic.Config) (*quic.Conn, error) {
	ep := u.s.endpoints.Load().byAddr[string(QUIC)+"://"+addr]
	if ep == nil {
		return nil, &dialError{Endpoint{Address: addr, Transport: QUIC}, errors.New("no longer an endpoint")}
	}
	if u.qt == nil {
		return nil, &dialError{ep.Endpoint, errors.New("the sidecar is not listening yet")}
	}
	ua, err := net.ResolveUDPAddr("udp", addr)
	if err != nil {
		return nil, &dialError{ep.Endpoint, err}
	}
	ctx, cancel := context.WithTimeout(ctx, u.s.cfg.Timeouts.Connect)
	defer cancel()
	conn, err := u.qt.Dial(ctx, ua, u.tlsFor(ep, http3.NextProtoH3), qc)
	if err != nil {
		return nil, &dialError{ep.Endpoint, err}
	}
	u.conns.trackQUIC(ep.key(), conn)
	return conn, nil
}

func (u *upstream) dialTLS(ctx context.Context, _, addr string, _ *tls.Config) (net.Conn, error) {
	ep := u.s.endpoints.Load().byAddr[string(H2)+"://"+addr]
	if ep == nil {
		return nil, &dialError{Endpoint{Address: addr, Transport: H2}, errors.New("no longer an endpoint")}
	}
	d := tls.Dialer{
		NetDialer: &net.Dialer{Timeout: u.s.cfg.Timeouts.Connect, KeepAlive: 15 * time.Second},
		Config:    u.tlsFor(ep, "h2"),
	}
	ctx, cancel := context.WithTimeout(ctx, u.s.cfg.Timeouts.Connect)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, &dialError{ep.Endpoint, err}
	}
	// In TLS 1.3 the client's handshake ends before the server has checked
	// the client's certificate. Read the server's first bytes (an HTTP/2
	// server speaks first: SETTINGS) so that a refusal is a dial error, and
	// hand them to the HTTP/2 client.
	if dl, ok := ctx.Deadline(); ok {
		c.SetReadDeadline(dl)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		c.Close()
		return nil, &dialError{ep.Endpoint, err}
	}
	c.SetReadDeadline(time.Time{})
	pc := &peekedConn{Conn: c, buf: buf[:n], closed: func(pc *peekedConn) { u.conns.remove(ep.key(), pc) }}
	u.conns.add(ep.key(), pc)
	return pc, nil
}

// peekedConn returns the bytes read ahead before reading the connection.
type peekedConn struct {
	net.Conn
	buf    []byte
	closed func(*peekedConn)
	once   sync.Once
}

func (c *peekedConn) Close() error {
	c.once.Do(func() { c.closed(c) })
	return c.Conn.Close()
}

func (c *peekedConn) Read(p []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(p, c.buf)
		c.buf = c.buf[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// Why a forwarded request failed; they choose the status code.
var (
	errPerTryTimeout  = errors.New("per-try timeout")
	errOverallTimeout = errors.New("overall timeout")
	errStreamIdle     = errors.New("stream idle timeout")
)

// noEndpointError: the destination unit has no endpoint of the service.
type noEndpointError struct{ service, unit string }

func (e *noEndpointError) Error() string {
	return fmt.Sprintf("no endpoint of service %q in unit %s", e.service, e.unit)
}

// RoundTrip sends req to an endpoint of the route's service in the route's
// unit: the one with the fewest requests in flight, another one when it
// cannot be reached (up to Config.Retries more), within the per-try and
// overall timeouts. As in Envoy, the timeouts count from the end of the
// request body (at once for a request without one) to the response
// headers, so a long upload is not cut for its length.
func (u *upstream) RoundTrip(req *http.Request) (*http.Response, error) {
	rt := routeOf(req.Context())
	cfg := &u.s.cfg
	ctx, cancelAll := context.WithCancelCause(req.Context())
	overall := &lateTimer{d: cfg.Timeouts.Overall, f: func() { cancelAll(errOverallTimeout) }}
	watch := newIdleWatch(cfg.Timeouts.StreamIdle, func() { cancelAll(errStreamIdle) })
	var body *retryBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryBody{rc: req.Body, watch: watch, attempt: 1}
		req.Body = body
	}
	body.whenSent(overall.arm)
	var avoid *endpoint
	var last error
	holdStart, hold := time.Now(), 5*time.Millisecond
	for attempt := 0; ; attempt++ {
		ep := u.s.endpoints.Load().pick(rt.service, rt.unit, time.Now(), avoid)
		if ep == nil {
			overall.stop()
			watch.stop()
			cancelAll(nil)
			body.closeReal()
			if last != nil { // the unit's only endpoint failed: say how
				return nil, last
			}
			return nil, &noEndpointError{rt.service, rt.unit}
		}
		resp, err := u.try(ctx, req, body, ep)
		if err == nil && behind(resp) && time.Since(holdStart) < mapBehindHold && body.advance() {
			// The receiving sidecar's map is behind ours (a move is being
			// pushed): nothing reached its app, so hold the request and
			// send it again once that map has had time to catch up.
			io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
			resp.Body.Close()
			ep.stats.inflight.Add(-1)
			hold = min(2*hold, 200*time.Millisecond)
			select {
			case <-time.After(hold):
				attempt--
				continue
			case <-ctx.Done():
				err := fmt.Errorf("held while %s's map was behind: %w", rt.unit, context.Cause(ctx))
				overall.stop()
				watch.stop()
				cancelAll(nil)
				body.closeReal()
				return nil, err
			}
		}
		if err == nil {
			overall.stop()
			u.s.healthy(ep)
			resp.Body = &doneBody{ReadCloser: resp.Body, watch: watch,
				done: func() { ep.stats.inflight.Add(-1); watch.stop(); cancelAll(nil) }}
			return resp, nil
		}
		ep.stats.inflight.Add(-1)
		if refusedBeforeRead(err) {
			// In TLS 1.3 the client finishes its side of the handshake
			// before the server checks the client's certificate, so a
			// refusal arrives after the dial: nothing reached the app.
			err = &dialError{ep.Endpoint, err}
		}
		var de *dialError
		if errors.As(err, &de) {
			u.s.unreachable(ep, err)
		}
		last = err
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", c, err)
		}
		if de == nil || attempt >= cfg.Retries || ctx.Err() != nil || !body.advance() {
			overall.stop()
			watch.stop()
			cancelAll(nil)
			body.closeReal()
			return nil, err
		}
		avoid = ep
	}
}

// mapBehindHold bounds how long a request is held and sent again while the
// receiving sidecar answers that its map is behind the sender's (503
// map-behind): a pushed map reaches every sidecar well within it, and a
// sidecar whose control-plane replica lost its quorum moves to another
// replica within about two seconds.
const mapBehindHold = 5 * time.Second

// behind reports whether resp is a sidecar's 503 map-behind (an app's
// X-Cellmesh-* headers never pass its sidecar).
func behind(resp *http.Response) bool {
	return resp.StatusCode == http.StatusServiceUnavailable && resp.Header.Get(hdrError) == "map-behind"
}

func (u *upstream) try(parent context.Context, req *http.Request, body *retryBody, ep *endpoint) (*http.Response, error) {
	ep.stats.inflight.Add(1)
	ctx, cancel := context.WithCancelCause(parent)
	perTry := &lateTimer{d: u.s.cfg.Timeouts.PerTry, f: func() { cancel(errPerTryTimeout) }}
	body.whenSent(perTry.arm)
	out := req.WithContext(ctx)
	if body != nil {
		out.Body = body.forAttempt()
	}
	out.URL.Scheme = "https"
	out.URL.Host = ep.Address
	var resp *http.Response
	var err error
	if ep.Transport == H2 {
		resp, err = u.h2.RoundTrip(out)
	} else {
		resp, err = u.h3.RoundTrip(out)
	}
	perTry.stop()
	if err != nil {
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil && parent.Err() == nil {
			err = fmt.Errorf("%w: %w", c, err)
		}
		cancel(nil)
		return nil, err
	}
	resp.Body = &doneBody{ReadCloser: resp.Body, done: func() { cancel(nil) }}
	return resp, nil
}

// retryBody lets a request body survive an attempt that failed before
// sending anything: transports close the body on error, so Close is
// deferred to closeReal, and sending tells whether a byte was read. It
// runs the whenSent hooks when the body has been read to its end. A nil
// *retryBody is a request without a body: sent from the start.
type retryBody struct {
	rc    io.ReadCloser
	watch *idleWatch // nil: none
	once  sync.Once

	mu      sync.Mutex
	eof     bool
	hooks   []func()
	attempt int // the attempt that may read (advance moves it on)
	// owner is the attempt that read first, 0 before any read: set under
	// mu, read without it on every Read once set.
	owner atomic.Int64
}

// errAbandonedAttempt is what an attempt given up on reads: a transport
// may still read the body of an attempt it was told to drop (HTTP/3 and
// HTTP/2 send bodies on their own goroutines), and must not take bytes
// meant for the next attempt.
var errAbandonedAttempt = errors.New("cellmesh: request body read by an abandoned attempt")

// Read reads for the current attempt; an attempt abandoned (advance)
// before it read anything gets errAbandonedAttempt.
func (b *retryBody) Read(p []byte) (int, error) { return b.readAs(b.current(), p) }

func (b *retryBody) current() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.attempt
}

// forAttempt is the body an attempt's transport reads.
func (b *retryBody) forAttempt() io.ReadCloser {
	return &attemptBody{b: b, id: b.current()}
}

type attemptBody struct {
	b  *retryBody
	id int
}

func (a *attemptBody) Read(p []byte) (int, error) { return a.b.readAs(a.id, p) }
func (a *attemptBody) Close() error               { return nil }

func (b *retryBody) readAs(id int, p []byte) (int, error) {
	if b.owner.Load() != int64(id) {
		b.mu.Lock()
		if b.owner.Load() == 0 && id == b.attempt {
			b.owner.Store(int64(id))
		}
		b.mu.Unlock()
		if b.owner.Load() != int64(id) {
			return 0, errAbandonedAttempt
		}
	}
	n, err := b.rc.Read(p)
	b.watch.touch()
	if err == io.EOF {
		b.mu.Lock()
		hooks := b.hooks
		b.eof, b.hooks = true, nil
		b.mu.Unlock()
		for _, f := range hooks {
			f()
		}
	}
	return n, err
}

// advance gives the body to a next attempt if no attempt has read any of
// it yet, and reports whether it did; from then on the attempts before
// read nothing. A request without a body (nil) can always be sent again.
func (b *retryBody) advance() bool {
	if b == nil {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.owner.Load() != 0 {
		return false
	}
	b.attempt++
	return true
}

// whenSent runs f once the whole body has been read (now, if it has).
func (b *retryBody) whenSent(f func()) {
	if b == nil {
		f()
		return
	}
	b.mu.Lock()
	if b.eof {
		b.mu.Unlock()
		f()
		return
	}
	b.hooks = append(b.hooks, f)
	b.mu.Unlock()
}

func (b *retryBody) sending() bool { return b != nil && b.owner.Load() != 0 }

// Close is called by transports; the real body is closed by closeReal, or
// by net/http when the handler returns.
func (b *retryBody) Close() error { return nil }

func (b *retryBody) closeReal() {
	if b == nil {
		return
	}
	b.once.Do(func() { b.rc.Close() })
}

// lateTimer runs f d after arm; stop, before or after arm, ends it for good.
type lateTimer struct {
	d       time.Duration
	f       func()
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

func (l *lateTimer) arm() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.stopped && l.t == nil {
		l.t = time.AfterFunc(l.d, l.f)
	}
}

func (l *lateTimer) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stopped = true
	if l.t != nil {
		l.t.Stop()
	}
}

// doneBody calls done once when the body is closed, and tells the watch
// (if any) that the stream moves.
type doneBody struct {
	io.ReadCloser
	watch *idleWatch
	once  sync.Once
	done  func()
}

func (b *doneBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.watch.touch()
	return n, err
}

func (b *doneBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

// refusedBeforeRead reports whether err is the peer refusing the request
// before reading any of it: a refused TLS handshake (a QUIC CRYPTO_ERROR
// from the peer, or a TLS alert it sent), a connection refused by a peer
// shutting down, or a stream it rejected (H3_REQUEST_REJECTED).
func refusedBeforeRead(err error) bool {
	var te *quic.TransportError
	if errors.As(err, &te) && te.Remote && (te.ErrorCode.IsCryptoError() || te.ErrorCode == quic.ConnectionRefused) {
		// A refused handshake, or a peer that is shutting down and
		// refuses the connection (CONNECTION_REFUSED): nothing was read.
		return true
	}
	var he *http3.Error
	if errors.As(err, &he) && he.Remote && he.ErrorCode == http3.ErrCodeRequestRejected {
		// H3_REQUEST_REJECTED: the peer (draining) did not process the
		// request, so it is safe to send it elsewhere.
		return true
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" {
		return true
	}
	// net/http's HTTP/2 client reports a connection that died before the
	// server's SETTINGS (so before any request was read) with an
	// unexported sentinel, or keeps only the alert's text.
	msg := err.Error()
	return strings.Contains(msg, "remote error: tls:") || strings.Contains(msg, "http2: client conn could not be established")
}

// localTransport sends the app's requests for its own unit and service to
// the app, bounded by the per-try timeout as a forwarded request is.
type localTransport struct {
	next       http.RoundTripper
	perTry     time.Duration
	streamIdle time.Duration
}

func (l localTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := &lateTimer{d: l.perTry, f: func() { cancel(errPerTryTimeout) }}
	watch := newIdleWatch(l.streamIdle, func() { cancel(errStreamIdle) })
	var body *retryBody
	if req.Body != nil && req.Body != http.NoBody {
		body = &retryBody{rc: req.Body, watch: watch, attempt: 1}
		req.Body = body
	}
	body.whenSent(timer.arm)
	resp, err := l.next.RoundTrip(req.WithContext(ctx))
	timer.stop()
	if err != nil {
		watch.stop()
		if c := context.Cause(ctx); c != nil && ctx.Err() != nil && req.Context().Err() == nil {
			err = fmt.Errorf("%w: %w", c, err)
		}
		cancel(nil)
		body.closeReal()
		return nil, err
	}
	resp.Body = &doneBody{ReadCloser: resp.Body, watch: watch, done: func() { watch.stop(); cancel(nil) }}
	return resp, nil
}

// idleWatch cancels a stream that moves no byte, either way, for d: a
// stalled upload to an app that does not read, or a response that stops.
type idleWatch struct {
	d       time.Duration
	cancel  func()
	base    time.Time    // monotonic origin of last
	last    atomic.Int64 // nanoseconds from base to the last progress
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

func newIdleWatch(d time.Duration, cancel func()) *idleWatch {
	w := &idleWatch{d: d, cancel: cancel, base: time.Now()}
	w.touch()
	w.mu.Lock()
	w.t = time.AfterFunc(d, w.check)
	w.mu.Unlock()
	return w
}

func (w *idleWatch) check() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if idle := time.Since(w.base) - time.Duration(w.last.Load()); idle < w.d {
		w.t.Reset(w.d - idle)
		return
	}
	w.stopped = true
	w.cancel()
}

// touch records progress; nil-safe.
func (w *idleWatch) touch() {
	if w != nil {
		w.last.Store(int64(time.Since(w.base))) // monotonic: a clock step changes nothing
	}
}

func (w *idleWatch) stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	w.t.Stop()
}
