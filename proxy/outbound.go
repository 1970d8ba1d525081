package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/quic-go/quic-go"
)

// Header names (DESIGN.md, "Headers"), in canonical form.
const (
	hdrUID        = "X-Cellmesh-Uid"
	hdrShard      = "X-Cellmesh-Shard"
	hdrEpoch      = "X-Cellmesh-Epoch"
	hdrUnit       = "X-Cellmesh-Unit"
	hdrRegion     = "X-Cellmesh-Region"
	hdrOriginUnit = "X-Cellmesh-Origin-Unit"
	hdrOwner      = "X-Cellmesh-Owner"
	hdrShadow     = "X-Cellmesh-Shadow"
	hdrTargetUnit = "X-Cellmesh-Target-Unit"
	hdrService    = "X-Cellmesh-Service"
	// hdrHops counts misroute corrections, so a request is corrected once.
	hdrHops = "X-Cellmesh-Hops"
	// hdrError names what failed when the sidecar answers instead of the app.
	hdrError = "X-Cellmesh-Error"
	// hdrConsistency: "linearizable" on a read asks for a refusal (503
	// no-lease) rather than data that may be stale.
	hdrConsistency = "X-Cellmesh-Consistency"
	// hdrStale marks the answer to a read served while the owner unit held
	// no lease: a standby may own the shard by now, with newer data.
	hdrStale = "X-Cellmesh-Stale"
	// globalShard is the x-cellmesh-shard value of the gzone writer.
	globalShard = "global"
)

// appHeaders are the x-cellmesh-* request headers an app may set; the
// outbound listener drops every other one, so an app cannot forge a
// routing decision, an epoch or its origin.
var appHeaders = map[string]bool{hdrUID: true, hdrShadow: true, hdrTargetUnit: true, hdrService: true, hdrConsistency: true}

// route is the decision for one request, carried in its context from the
// handler to the transport and the error handler.
type route struct {
	direction string
	service   string
	src       string // unit the request came from
	unit      string // destination unit
	region    string
	zone      string
	shard     int // routing.GlobalShard when the route is not user-sharded
	epoch     uint64
	fenced    bool // shard and epoch headers are sent
	// tooLarge: the body went over Limits.MaxBodyBytes while streaming.
	tooLarge atomic.Bool
	shadow   bool
	hops     int
}

type routeKey struct{}

func routeOf(ctx context.Context) *route {
	rt, _ := ctx.Value(routeKey{}).(*route)
	if rt == nil {
		rt = &route{}
	}
	return rt
}

// serveOutbound routes a request from the local app to the user's home unit.
func (s *Sidecar) serveOutbound(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	rt := &route{direction: "outbound", src: s.cfg.Identity.Unit, shard: routing.GlobalShard,
		shadow: r.Header.Get(hdrShadow) == "1"}
	s.m.inflightBy[rt.direction].Inc()
	defer func() {
		s.m.inflightBy[rt.direction].Dec()
		s.m.observe(rt.direction, rt.service, rt.src, rt.unit, rt.zone, sw.code(), rt.shadow, time.Since(start))
	}()

	m := s.live.Load()
	if m == nil {
		answer(sw, http.StatusServiceUnavailable, "no-map", "no shard map loaded yet: the sidecar is starting or cannot read its configuration")
		return
	}
	svc := serviceOf(r)
	if svc == "" {
		answer(sw, http.StatusBadRequest, "no-service", "no target service: set the Host header or x-cellmesh-service to the service's name")
		return
	}
	if !s.endpoints.Load().hasService(svc) {
		// Not a label: any caller could grow the metrics without bound.
		rt.service = "unknown"
		answer(sw, http.StatusNotFound, "unknown-service", fmt.Sprintf("unknown service %q: no unit has an endpoint of it", svc))
		return
	}
	rt.service = svc
	switch {
	case r.Method == http.MethodConnect:
		answer(sw, http.StatusMethodNotAllowed, "bad-method", "CONNECT is not proxied: send the request itself to the service")
		return
	case r.Header.Get("Upgrade") != "":
		answer(sw, http.StatusNotImplemented, "upgrade", fmt.Sprintf("protocol upgrades (Upgrade: %s) are not carried between units", r.Header.Get("Upgrade")))
		return
	case !canonicalPath(r.URL.Path):
		// The key may come from the path: "//", "." and ".." segments could
		// hide it from routing yet show it to the app.
		answer(sw, http.StatusBadRequest, "bad-path", fmt.Sprintf("path %q has empty, \".\" or \"..\" segments: send it in canonical form", r.URL.Path))
		return
	}
	if n, max := headerBytes(r), s.cfg.Limits.MaxHeaderBytes; n > max {
		// net/http lets up to 4 KiB more through; the limit is exact here.
		answer(sw, http.StatusRequestHeaderFieldsTooLarge, "headers-too-large", fmt.Sprintf("request line and headers of %d bytes are over the limit of %d bytes", n, max))
		return
	}
	if max := s.cfg.Limits.MaxBodyBytes; max > 0 {
		if r.ContentLength > max {
			answer(sw, http.StatusRequestEntityTooLarge, "body-too-large", fmt.Sprintf("request body of %d bytes is over the limit of %d bytes", r.ContentLength, max))
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = &limitBody{ReadCloser: r.Body, left: max, rt: rt}
		}
	}
	req := routing.Request{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Header: r.Header, LocalUnit: s.cfg.Identity.Unit}
	d, err := m.Decide(&req)
	if err != nil {
		code, kind := http.StatusBadRequest, "bad-key"
		var use *routing.UnknownShardError
		if errors.As(err, &use) || errors.Is(err, routing.ErrNoLocalUnit) {
			code, kind = http.StatusServiceUnavailable, "no-route"
		}
		answer(sw, code, kind, "cannot route the request: "+err.Error())
		return
	}
	rt.zone, rt.unit, rt.region, rt.shard, rt.epoch = string(d.Zone), d.Unit, d.Region, d.Shard, d.Epoch
	rt.fenced = !d.LocalFallback && d.Zone != routing.KindCZone
	if t := r.Header.Get(hdrTargetUnit); t != "" {
		u, ok := m.Unit(t)
		if !ok {
			answer(sw, http.StatusBadRequest, "unknown-unit", fmt.Sprintf("x-cellmesh-target-unit names unit %q, which is not in topology version %d", t, m.Version()))
			return
		}
		rt.unit, rt.region, rt.fenced = u.Name, u.Region, false
	}
	r = r.WithContext(context.WithValue(r.Context(), routeKey{}, rt))
	if rt.unit == s.cfg.Identity.Unit && rt.service == s.cfg.Identity.Service {
		// The app calls its own service in its own unit: this sidecar's map
		// is the owner's map, so the fence holds by construction and the
		// request goes straight to the app, without a hop through the mesh.
		rh := sw.Header()
		rh[hdrUnit] = []string{rt.unit}
		rh[hdrRegion] = []string{rt.region}
		if rt.fenced {
			owner, ok := s.holdDraining(sw, r, rt, rt.shard)
			if !ok {
				return
			}
			if owner != nil {
				// Handed off while held: the write goes to the new owner.
				rt.unit, rt.region, rt.epoch = owner.Unit, owner.Region, owner.Epoch
				delete(rh, hdrUnit)
				delete(rh, hdrRegion)
				s.outProxy.ServeHTTP(sw, r)
				return
			}
			if s.refuseWithoutLease(sw, r, d.Write, routing.ShardName(rt.shard)) {
				return
			}
		}
		s.localProxy.ServeHTTP(sw, r)
		return
	}
	s.outProxy.ServeHTTP(sw, r)
}

// serviceOf is the target service: x-cellmesh-service, or the Host header
// without its port.
func serviceOf(r *http.Request) string {
	if s := r.Header.Get(hdrService); s != "" {
		return strings.ToLower(s)
	}
	h := r.Host
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return strings.ToLower(h)
}

// canonicalPath reports whether p has no empty, "." or ".." segments
// (a trailing slash is fine).
func canonicalPath(p string) bool {
	for i := 0; i < len(p); {
		if p[i] != '/' {
			return p == "*" && i == 0 // OPTIONS *
		}
		j := i + 1
		for j < len(p) && p[j] != '/' {
			j++
		}
		switch seg := p[i+1 : j]; {
		case seg == "." || seg == "..":
			return false
		case seg == "" && j < len(p):
			return false
		}
		i = j
	}
	return true
}

// rewriteOutbound prepares the request for the peer: the routing headers
// replace whatever the app sent under those names. httputil.ReverseProxy
// has already dropped the hop-by-hop headers.
func (s *Sidecar) rewriteOutbound(pr *httputil.ProxyRequest) {
	rt := routeOf(pr.In.Context())
	out := pr.Out
	out.URL.Scheme = "https"
	out.URL.Host = rt.unit // replaced by the endpoint's address per attempt
	out.Host = pr.In.Host
	passTrailers(pr)
	s.routingHeaders(out.Header, pr.In.Header, rt)
}

// rewriteLocal sends a request of the app for its own unit and service
// straight to the app, with the headers a peer's request would carry.
func (s *Sidecar) rewriteLocal(pr *httputil.ProxyRequest) {
	s.rewriteApp(pr)
	s.routingHeaders(pr.Out.Header, pr.In.Header, routeOf(pr.In.Context()))
}

// routingHeaders replaces the app's x-cellmesh-* headers (but those it may
// set, copied from in: a Connection header cannot strip what routing used)
// with the routing decision.
func (s *Sidecar) routingHeaders(h, in http.Header, rt *route) {
	for k := range h {
		if strings.HasPrefix(k, "X-Cellmesh-") && !appHeaders[k] {
			delete(h, k)
		}
	}
	for k := range appHeaders {
		if v, ok := in[k]; ok {
			h[k] = v
		}
	}
	h[hdrService] = []string{rt.service}
	h[hdrUnit] = []string{rt.unit}
	h[hdrRegion] = []string{rt.region}
	h[hdrOriginUnit] = []string{s.cfg.Identity.Unit}
	if rt.fenced {
		if rt.shard == routing.GlobalShard {
			h[hdrShard] = []string{globalShard}
		} else {
			h[hdrShard] = []string{strconv.Itoa(rt.shard)}
		}
		h[hdrEpoch] = []string{strconv.FormatUint(rt.epoch, 10)}
	}
	if rt.hops > 0 {
		h[hdrHops] = []string{strconv.Itoa(rt.hops)}
	}
}

// forwardError answers for a request the peers did not: which unit, what
// failed, and what to do, with x-cellmesh-error naming the kind.
func (s *Sidecar) forwardError(w http.ResponseWriter, r *http.Request, err error) {
	rt := routeOf(r.Context())
	target := "unit " + rt.unit
	if s.commonError(w, r, err, target) {
		s.log.Debug("forward failed", "direction", rt.direction, "dst_unit", rt.unit, "error", err)
		return
	}
	var (
		ne *noEndpointError
		de *dialError
	)
	switch {
	case errors.As(err, &ne):
		answer(w, http.StatusServiceUnavailable, "no-endpoint", ne.Error()+": check the endpoints of the configuration or the control plane")
	case errors.Is(err, errOverallTimeout):
		answer(w, http.StatusGatewayTimeout, "timeout", fmt.Sprintf("%s did not answer within the overall timeout of %s", target, s.cfg.Timeouts.Overall))
	case errors.As(err, &de):
		answer(w, http.StatusServiceUnavailable, "unreachable", fmt.Sprintf("%s is unreachable: %v", target, de))
	case errors.As(err, new(*quic.IdleTimeoutError)):
		answer(w, http.StatusServiceUnavailable, "unreachable", fmt.Sprintf("%s went silent (QUIC idle timeout): %v", target, err))
	default:
		answer(w, http.StatusBadGateway, "upstream", fmt.Sprintf("forwarding to %s failed: %v", target, err))
	}
	s.log.Debug("forward failed", "direction", rt.direction, "dst_unit", rt.unit, "error", err)
}

// commonError answers the failures every proxy of the sidecar shares: the
// client gone (499, nothing written), a body over the limit, the per-try
// and stream idle timeouts. It reports whether it answered; target names
// who did not answer ("unit eu-west-1", "the echo app of ...").
func (s *Sidecar) commonError(w http.ResponseWriter, r *http.Request, err error, target string) bool {
	switch {
	case r.Context().Err() != nil:
		// The client went away; nobody reads an answer. 499 as nginx counts it.
		if sw, ok := w.(*statusWriter); ok {
			sw.status = 499
		}
	case routeOf(r.Context()).tooLarge.Load():
		answer(w, http.StatusRequestEntityTooLarge, "body-too-large", fmt.Sprintf("request body is over the limit of %d bytes", s.cfg.Limits.MaxBodyBytes))
	case errors.Is(err, errPerTryTimeout):
		answer(w, http.StatusGatewayTimeout, "timeout", fmt.Sprintf("%s did not answer within the per-try timeout of %s", target, s.cfg.Timeouts.PerTry))
	case errors.Is(err, errStreamIdle):
		// The client's body is stalled: do not wait to read the rest of it
		// (net/http would, before answering), close the connection instead.
		w.Header().Set("Connection", "close")
		answer(w, http.StatusGatewayTimeout, "stream-idle", fmt.Sprintf("no byte moved to or from %s for %s (timeouts.stream_idle)", target, s.cfg.Timeouts.StreamIdle))
	default:
		return false
	}
	return true
}

// answer writes the sidecar's own reply: a one-line plain-text body.
func answer(w http.ResponseWriter, code int, kind, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set(hdrError, kind)
	w.WriteHeader(code)
	fmt.Fprintf(w, "cellmesh: %s\n", msg)
}

// statusWriter remembers the status code; Unwrap keeps Flush and the
// other http.ResponseController methods working through it.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
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

func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// errBodyTooLarge stops a request body at Limits.MaxBodyBytes.
var errBodyTooLarge = errors.New("request body over the size limit")

// limitBody ends a streaming request body at its limit and marks the route,
// so the answer is 413 whatever the peer made of the cut body.
type limitBody struct {
	io.ReadCloser
	left int64
	rt   *route
}

func (b *limitBody) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, errBodyTooLarge
	}
	if int64(len(p))-1 > b.left { // read one byte past the limit to see it crossed
		p = p[:b.left+1]
	}
	n, err := b.ReadCloser.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		b.rt.tooLarge.Store(true)
		return n - 1, errBodyTooLarge
	}
	return n, err
}

// overLimit refuses a response to a request whose body was cut at the
// limit: the answer is the sidecar's 413, not what the peer said.
func overLimit(resp *http.Response) error {
	if routeOf(resp.Request.Context()).tooLarge.Load() {
		return errBodyTooLarge
	}
	return nil
}

// headerBytes is the size of the request line and headers as received.
func headerBytes(r *http.Request) int {
	n := len(r.Method) + len(r.RequestURI) + len(r.Proto) + 4 + len(r.Host) + 8
	for k, vs := range r.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}
