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
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/quic-go/quic-go/http3"
)

// serveInbound takes a request from a peer sidecar (its certificate was
// checked in the handshake), fences it against this sidecar's map and
// hands it to the local app.
//
// No request arrives as 0-RTT early data: the QUIC listener refuses early
// data, so a replayed write can never reach the app.
func (s *Sidecar) serveInbound(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	sw := &statusWriter{ResponseWriter: w}
	id := s.cfg.Identity
	rt := &route{direction: "inbound", service: id.Service, unit: id.Unit, region: id.Region,
		shard: routing.GlobalShard, shadow: r.Header.Get(hdrShadow) == "1"}
	s.m.inflightBy[rt.direction].Inc()
	defer func() {
		s.m.inflightBy[rt.direction].Dec()
		s.m.observe(rt.direction, rt.service, rt.src, id.Unit, rt.zone, sw.code(), rt.shadow, time.Since(start))
	}()
	rh := sw.Header()
	rh[hdrUnit] = []string{id.Unit}
	rh[hdrRegion] = []string{id.Region}

	if r.TLS == nil {
		answer(sw, http.StatusForbidden, "no-identity", "inbound requests must come over mutual TLS from a mesh sidecar")
		return
	}
	peer, err := meshtls.PeerID(r.TLS.PeerCertificates)
	if err != nil {
		answer(sw, http.StatusForbidden, "no-identity", "peer certificate: "+err.Error())
		return
	}
	rt.src = peer.Unit
	h := r.Header
	if peer.Service == meshtls.ControlPlaneService {
		// The orchestrator calls the app's handoff contract (watermarks,
		// promote, demote), and nothing else.
		if !strings.HasPrefix(r.URL.Path, contractPrefix) || !canonicalPath(r.URL.Path) {
			answer(sw, http.StatusForbidden, "not-contract", fmt.Sprintf("a control-plane replica may call only the handoff contract (%s...) through a sidecar, not %s", contractPrefix, r.URL.Path))
			return
		}
		for k := range h {
			if strings.HasPrefix(k, "X-Cellmesh-") {
				delete(h, k)
			}
		}
		h[hdrUnit] = []string{id.Unit}
		h[hdrRegion] = []string{id.Region}
		s.appProxy.ServeHTTP(sw, r)
		return
	}
	if rest, ok := strings.CutPrefix(r.URL.Path, contractPrefix); ok {
		// The handoff contract's calls are the control plane's; the rest
		// of the prefix (a service's replication between its units) is
		// the service's own.
		switch {
		case rest == "promote" || rest == "demote" || rest == "replication":
			answer(sw, http.StatusForbidden, "not-contract", fmt.Sprintf("%s%s is the control plane's call; %s may not make it", contractPrefix, rest, peer))
			return
		case peer.Service != id.Service:
			answer(sw, http.StatusForbidden, "not-contract", fmt.Sprintf("%s... is for the units of service %s; %s may not call it", contractPrefix, id.Service, peer))
			return
		}
	}
	if svc := h.Get(hdrService); svc != "" && svc != id.Service {
		s.m.misrouted.WithLabelValues("refused").Inc()
		answer(sw, http.StatusMisdirectedRequest, "wrong-service", fmt.Sprintf("this sidecar fronts service %s of unit %s, not %s", id.Service, id.Unit, svc))
		return
	}
	if u := h.Get(hdrUnit); u != "" && u != id.Unit {
		s.m.misrouted.WithLabelValues("refused").Inc()
		answer(sw, http.StatusMisdirectedRequest, "wrong-unit", fmt.Sprintf("this sidecar is in unit %s, not %s", id.Unit, u))
		return
	}
	m := s.live.Load()
	if m == nil {
		answer(sw, http.StatusServiceUnavailable, "no-map", "no shard map loaded yet: retry")
		return
	}
	if !canonicalPath(r.URL.Path) {
		answer(sw, http.StatusBadRequest, "bad-path", fmt.Sprintf("path %q has empty, \".\" or \"..\" segments", r.URL.Path))
		return
	}
	req := routing.Request{Method: r.Method, Path: r.URL.Path, RawQuery: r.URL.RawQuery, Header: h, LocalUnit: peer.Unit}
	if t := h.Get(hdrTargetUnit); t != "" {
		// Pinned to this unit (replication between units): no fence here;
		// the app's data layer checks the epoch its own protocol carries.
		// No shard or epoch reaches the app unchecked.
		zone, _ := m.Zone(&req)
		rt.zone = string(zone)
		if t != id.Unit {
			s.m.misrouted.WithLabelValues("refused").Inc()
			answer(sw, http.StatusMisdirectedRequest, "wrong-unit", fmt.Sprintf("the request is pinned to unit %s, this sidecar is in %s", t, id.Unit))
			return
		}
		delete(h, hdrShard)
		delete(h, hdrEpoch)
	} else {
		// The sidecar decides again from the request itself: a request for
		// user or global data is served only with its shard's current epoch.
		d, err := m.Decide(&req)
		rt.zone = string(d.Zone)
		if err != nil {
			answer(sw, http.StatusBadRequest, "bad-key", "cannot route the request: "+err.Error())
			return
		}
		if d.LocalFallback || d.Zone == routing.KindCZone {
			delete(h, hdrShard)
			delete(h, hdrEpoch)
		} else {
			want := globalShard
			if d.Shard != routing.GlobalShard {
				want = strconv.Itoa(d.Shard)
			}
			switch v := h.Get(hdrShard); v {
			case "":
				answer(sw, http.StatusBadRequest, "unfenced", fmt.Sprintf("x-cellmesh-shard is missing: a request for %s data (shard %s) must carry its shard and epoch", d.Zone, want))
				return
			case want:
				if !s.fence(sw, r, m, rt, d.Shard) {
					return
				}
				owner, ok := s.holdDraining(sw, r, rt, d.Shard)
				if !ok {
					return
				}
				if owner != nil {
					s.forwardToOwner(sw, r, rt, *owner)
					return
				}
				if s.refuseWithoutLease(sw, r, d.Write, routing.ShardName(d.Shard)) {
					return
				}
			default:
				answer(sw, http.StatusBadRequest, "bad-shard", fmt.Sprintf("x-cellmesh-shard %q does not match shard %s of the request's key", v, want))
				return
			}
		}
	}
	h[hdrOriginUnit] = []string{peer.Unit} // from the certificate, not the peer's word
	h[hdrUnit] = []string{id.Unit}
	h[hdrRegion] = []string{id.Region}
	delete(h, hdrHops)
	s.appProxy.ServeHTTP(sw, r)
}

// mapBehindWait bounds how long a request whose epoch is newer than this
// sidecar's map waits for the map before it is answered 503 map-behind.
const mapBehindWait = time.Second

// contractPrefix starts the paths of the handoff contract.
const contractPrefix = "/.well-known/cellmesh/"

// fence checks the epoch of a request for shard (its key's, which the
// request's x-cellmesh-shard matched) against the map. It returns
// true when this unit owns the shard at that epoch; otherwise it has
// answered (421, 400 or 503) or corrected the route, and returns false.
func (s *Sidecar) fence(w *statusWriter, r *http.Request, m *routing.ShardMap, rt *route, shard int) bool {
	owner, err := m.Lookup(shard)
	if err != nil {
		answer(w, http.StatusBadRequest, "bad-shard", "x-cellmesh-shard: "+err.Error())
		return false
	}
	v := routing.ShardName(shard)
	epoch, err := strconv.ParseUint(r.Header.Get(hdrEpoch), 10, 64)
	if err != nil {
		answer(w, http.StatusBadRequest, "bad-epoch", fmt.Sprintf("x-cellmesh-epoch %q: want the shard's epoch, a whole number", r.Header.Get(hdrEpoch)))
		return false
	}
	rt.shard, rt.epoch = shard, epoch
	self := s.cfg.Identity.Unit
	if epoch > owner.Epoch {
		// The sender's map is newer than ours (a move is being pushed):
		// wait a moment for ours, holding the request here, where its body
		// is still unread.
		deadline := time.NewTimer(mapBehindWait)
		defer deadline.Stop()
	wait:
		for epoch > owner.Epoch {
			ch := s.mapChanged()
			if cur := s.live.Load(); cur != m {
				m = cur
				if owner, err = m.Lookup(shard); err != nil {
					answer(w, http.StatusBadRequest, "bad-shard", "x-cellmesh-shard: "+err.Error())
					return false
				}
				continue
			}
			select {
			case <-ch:
			case <-deadline.C:
				break wait
			case <-r.Context().Done():
				break wait
			}
		}
	}
	switch {
	case epoch == owner.Epoch && owner.Unit == self:
		return true
	case epoch > owner.Epoch:
		// The sender has a newer map than ours: we cannot tell who owns the
		// shard, so neither take the request nor point elsewhere.
		w.Header().Set("Retry-After", "1")
		w.Header().Set(hdrEpoch, strconv.FormatUint(owner.Epoch, 10))
		answer(w, http.StatusServiceUnavailable, "map-behind", fmt.Sprintf("%s has epoch %d here but %d in the request: this sidecar's map (version %d) is behind; retry", v, owner.Epoch, epoch, m.Version()))
		return false
	case epoch < owner.Epoch:
		s.m.fenced.Inc()
	}
	// Misrouted or stale: the owner is another unit, or this one at a later epoch.
	hops, _ := strconv.Atoi(r.Header.Get(hdrHops))
	if s.cfg.MisrouteCorrection && owner.Unit != self && hops == 0 {
		s.m.misrouted.WithLabelValues("corrected").Inc()
		s.forwardToOwner(w, r, rt, owner)
		return false
	}
	s.m.misrouted.WithLabelValues("refused").Inc()
	w.Header().Set(hdrOwner, owner.Unit)
	w.Header().Set(hdrEpoch, strconv.FormatUint(owner.Epoch, 10))
	answer(w, http.StatusMisdirectedRequest, "misrouted", fmt.Sprintf("%s is owned by unit %s at epoch %d; the request was for epoch %d at unit %s", v, owner.Unit, owner.Epoch, epoch, self))
	return false
}

// forwardToOwner sends an inbound request once to the shard's owner
// elsewhere (misroute correction, a request held through a handoff).
func (s *Sidecar) forwardToOwner(w http.ResponseWriter, r *http.Request, rt *route, owner routing.Owner) {
	hops, _ := strconv.Atoi(r.Header.Get(hdrHops))
	fwd := &route{direction: "inbound", service: s.cfg.Identity.Service, src: rt.src, unit: owner.Unit,
		region: owner.Region, zone: rt.zone, shard: owner.Shard, epoch: owner.Epoch, fenced: true, shadow: rt.shadow, hops: hops + 1}
	rt.unit = owner.Unit
	w.Header().Del(hdrUnit)
	w.Header().Del(hdrRegion)
	s.outProxy.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), routeKey{}, fwd)))
}

// rewriteApp sends an inbound request to the local app.
func (s *Sidecar) rewriteApp(pr *httputil.ProxyRequest) {
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = s.cfg.App
	pr.Out.Host = pr.In.Host
	passTrailers(pr)
}

// passTrailers forwards the request's trailers: the keys declared up front,
// the values once the body has been read. It also lets the app transport
// send the request again when its body was empty (see GetBody below). (quic-go's HTTP/3 server puts
// the received trailers in a new map after the body, so the incoming map
// is read at the end of the body, not shared.)
func passTrailers(pr *httputil.ProxyRequest) {
	in, out := pr.In, pr.Out
	if out.Body == nil || out.Body == http.NoBody {
		out.Trailer = nil
		return
	}
	out.Trailer = make(http.Header, len(in.Trailer))
	for k := range in.Trailer {
		if !strings.HasPrefix(k, "X-Cellmesh-") {
			out.Trailer[k] = nil
		}
	}
	tc := &trailerCopier{ReadCloser: out.Body, in: in, out: out.Trailer}
	out.Body = tc
	// An app that closed a kept-alive connection (it restarted, or timed
	// the connection out) fails the next request sent on it. net/http sends
	// such a request again on another connection when it can replay it:
	// here when the body was empty (a GET arriving over HTTP/3 or HTTP/2
	// has a body of unknown length, most often empty) or never read.
	out.GetBody = func() (io.ReadCloser, error) {
		if tc.empty.Load() {
			return http.NoBody, nil
		}
		return nil, errBodySent
	}
}

// errBodySent stops the app transport from sending a request again on
// another connection once part of its body is gone.
var errBodySent = errors.New("the app closed a kept-alive connection before answering, and the request body, already sent in part, cannot be sent again")

// trailerCopier copies the incoming request's trailers into the outgoing
// request's when the body ends, before the transport writes them.
type trailerCopier struct {
	io.ReadCloser
	in    *http.Request
	out   http.Header
	done  bool
	sent  bool        // a byte was read
	empty atomic.Bool // the body ended before any byte
}

func (b *trailerCopier) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.sent = true
	}
	if err == io.EOF && !b.done {
		b.empty.Store(!b.sent)
		b.done = true
		for k, v := range b.in.Trailer {
			if len(v) > 0 && !strings.HasPrefix(k, "X-Cellmesh-") {
				b.out[k] = v
			}
		}
	}
	return n, err
}

// appResponse drops the x-cellmesh-* headers an app answered with: an app
// cannot pass for a sidecar's 421 or error.
func (s *Sidecar) appResponse(resp *http.Response) error {
	for k := range resp.Header {
		if strings.HasPrefix(k, "X-Cellmesh-") {
			delete(resp.Header, k) // only sidecars speak for the mesh
		}
	}
	return overLimit(resp)
}

// appError answers when the local app did not.
func (s *Sidecar) appError(w http.ResponseWriter, r *http.Request, err error) {
	app := fmt.Sprintf("the %s app of unit %s at %s", s.cfg.Identity.Service, s.cfg.Identity.Unit, s.cfg.App)
	if s.commonError(w, r, err, app) {
		s.log.Debug("app request failed", "error", err)
		return
	}
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		answer(w, http.StatusServiceUnavailable, "app-down", app+" refused the connection: is it running?")
	case errors.As(err, &ne) && ne.Timeout():
		answer(w, http.StatusGatewayTimeout, "app-timeout", app+" did not answer in time: "+err.Error())
	default:
		answer(w, http.StatusBadGateway, "app-error", app+" failed: "+err.Error())
	}
	s.log.Debug("app request failed", "error", err)
}

// buildServers builds the HTTP servers and proxies; Listen binds them.
func (s *Sidecar) buildServers() {
	errLog := slogLogLogger(s.log)
	pool := bufferPool{}
	s.outProxy = &httputil.ReverseProxy{Rewrite: s.rewriteOutbound, Transport: s.up, ModifyResponse: overLimit,
		ErrorHandler: s.forwardError, ErrorLog: errLog, BufferPool: pool}
	appTr := &http.Transport{
		DialContext:            (&net.Dialer{Timeout: s.cfg.Timeouts.Connect, KeepAlive: 15 * time.Second}).DialContext,
		MaxIdleConns:           1024,
		MaxIdleConnsPerHost:    1024,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: int64(s.cfg.Limits.MaxHeaderBytes),
		DisableCompression:     true,
	}
	s.appProxy = &httputil.ReverseProxy{Rewrite: s.rewriteApp, Transport: appTr, ModifyResponse: s.appResponse,
		ErrorHandler: s.appError, ErrorLog: errLog, BufferPool: pool}
	s.localProxy = &httputil.ReverseProxy{Rewrite: s.rewriteLocal, Transport: localTransport{appTr, s.cfg.Timeouts.PerTry, s.cfg.Timeouts.StreamIdle}, ModifyResponse: s.appResponse,
		ErrorHandler: s.appError, ErrorLog: errLog, BufferPool: pool}

	out := new(http.Protocols)
	out.SetHTTP1(true)
	out.SetUnencryptedHTTP2(true)
	s.outSrv = &http.Server{
		Handler:           http.HandlerFunc(s.serveOutbound),
		Protocols:         out,
		MaxHeaderBytes:    s.cfg.Limits.MaxHeaderBytes,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       120 * time.Second,
		ErrorLog:          errLog,
	}
	tc := s.cfg.TLS.ServerConfig(s.authorizePeer, s.tlsRejected("inbound"))
	tc.NextProtos = []string{"h2"}
	tcpProtos := new(http.Protocols)
	tcpProtos.SetHTTP2(true)
	s.tcpSrv = &http.Server{
		Handler:           http.HandlerFunc(s.serveInbound),
		TLSConfig:         tc,
		Protocols:         tcpProtos,
		MaxHeaderBytes:    inboundHeaderBytes(s.cfg.Limits.MaxHeaderBytes),
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       s.cfg.Timeouts.Idle,
		ErrorLog:          errLog,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: s.cfg.Limits.MaxStreamsPerPeer},
	}
	s.h3Srv = &http3.Server{
		Handler:        http.HandlerFunc(s.serveInbound),
		MaxHeaderBytes: inboundHeaderBytes(s.cfg.Limits.MaxHeaderBytes),
		IdleTimeout:    s.cfg.Timeouts.Idle,
		Logger:         s.log,
	}
	s.adminSrv = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 5 * time.Second, ErrorLog: errLog}
}

// inboundHeaderBytes is the inbound listeners' header limit: the app's
// limit, which the sender enforced, plus room for the x-cellmesh-* headers
// the sender adds and HTTP/3's 32 bytes of accounting per field.
func inboundHeaderBytes(limit int) int { return 2*limit + 8<<10 }

// bufferPool lends the 32 KiB buffers bodies are copied through, instead of
// httputil.ReverseProxy allocating one per request.
type bufferPool struct{}

var copyBuffers = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

func (bufferPool) Get() []byte  { return *copyBuffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { copyBuffers.Put(&b) }
