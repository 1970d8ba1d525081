package controlplane

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
)

// registry follows the xDS streams of a replica: who is connected, and
// which sidecars register as endpoints through their node metadata. It
// queues registrations and deregistrations and commits them in batches
// through the leader, in order, retrying until they land.
type registry struct {
	r       *Replica
	mu      sync.Mutex
	streams map[int64]*xdsStream
	pending []store.EndpointChange
	kick    chan struct{}
}

type xdsStream struct {
	peer   meshtls.ID
	remote string
	node   string
	reg    *store.Registration
}

func newRegistry(r *Replica) *registry {
	g := &registry{r: r, streams: map[int64]*xdsStream{}, kick: make(chan struct{}, 1)}
	// The sessions of this replica's earlier life are gone with it.
	g.queue(store.EndpointChange{Purge: true, Registration: store.Registration{Via: r.cfg.ID, Session: r.boot}})
	return g
}

func (g *registry) callbacks() server.Callbacks {
	return server.CallbackFuncs{
		StreamOpenFunc:        g.open,
		StreamClosedFunc:      g.closed,
		StreamRequestFunc:     g.request,
		StreamResponseFunc:    g.response,
		DeltaStreamOpenFunc:   g.open,
		DeltaStreamClosedFunc: g.closed,
	}
}

// open admits a stream from a peer whose mesh certificate was checked by
// the TLS handshake.
func (g *registry) open(ctx context.Context, id int64, _ string) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return errors.New("no peer on the stream")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return errors.New("xDS needs mutual TLS")
	}
	pid, err := meshtls.PeerID(info.State.PeerCertificates)
	if err != nil {
		return fmt.Errorf("peer certificate: %w", err)
	}
	g.mu.Lock()
	g.streams[id] = &xdsStream{peer: pid, remote: p.Addr.String()}
	g.mu.Unlock()
	g.r.m.connected.Inc()
	return nil
}

func (g *registry) closed(id int64, _ *core.Node) {
	g.mu.Lock()
	s, ok := g.streams[id]
	delete(g.streams, id)
	g.mu.Unlock()
	if !ok {
		return
	}
	g.r.m.connected.Dec()
	if s.reg != nil {
		// The deregistration follows the registration in the queue; a pair
		// not committed yet is dropped whole (compact), so a late
		// registration cannot replace the sidecar's newer one made through
		// another replica.
		g.queue(store.EndpointChange{Deregister: true, Registration: *s.reg})
		g.r.log.Info("sidecar disconnected", "node", s.node, "service", s.reg.Service, "unit", s.reg.Unit, "address", s.reg.Address)
	}
}

// request counts ACKs and NACKs and registers the node of a stream's first
// request that carries registration metadata.
func (g *registry) request(id int64, req *discovery.DiscoveryRequest) error {
	typ := typeName(req.GetTypeUrl())
	if req.GetResponseNonce() != "" {
		if d := req.GetErrorDetail(); d != nil {
			g.r.m.acks.WithLabelValues(typ, "nack").Inc()
			g.r.log.Warn("a client refused an update (NACK); it keeps its previous version",
				"node", req.GetNode().GetId(), "type", typ, "nonce", req.GetResponseNonce(), "reason", d.GetMessage())
		} else {
			g.r.m.acks.WithLabelValues(typ, "ack").Inc()
		}
	}
	g.mu.Lock()
	s, ok := g.streams[id]
	if !ok || s.reg != nil || s.node != "" || req.GetNode() == nil {
		g.mu.Unlock()
		return nil
	}
	s.node = req.GetNode().GetId()
	reg, err := g.registration(id, s.peer, req.GetNode())
	if err != nil {
		g.mu.Unlock()
		g.r.log.Warn("refused an xDS client's registration", "node", s.node, "peer", s.peer.String(), "remote", s.remote, "error", err)
		return err
	}
	s.reg = reg
	g.mu.Unlock()
	if reg != nil {
		g.queue(store.EndpointChange{Registration: *reg})
		g.r.log.Info("sidecar connected", "node", s.node, "service", reg.Service, "unit", reg.Unit, "address", reg.Address, "transport", reg.Transport)
	}
	return nil
}

// registration reads a node's metadata: nil when it does not register
// (an xDS client that only reads), an error when what it claims is not
// what its certificate says or the map cannot route to it.
func (g *registry) registration(id int64, pid meshtls.ID, n *core.Node) (*store.Registration, error) {
	f := n.GetMetadata().GetFields()
	get := func(k string) string { return f[k].GetStringValue() }
	addr := get(xdsapi.MetaAddress)
	if addr == "" {
		return nil, nil
	}
	reg := &store.Registration{
		Service: get(xdsapi.MetaService), Unit: get(xdsapi.MetaUnit), Region: get(xdsapi.MetaRegion),
		Address: addr, Transport: get(xdsapi.MetaTransport), Node: n.GetId(),
		Via: g.r.cfg.ID, Session: g.r.boot + strconv.FormatInt(id, 10), Since: time.Now().UTC(),
	}
	if reg.Transport == "" {
		reg.Transport = "quic"
	}
	if reg.Service != pid.Service || reg.Unit != pid.Unit || reg.Region != pid.Region {
		return nil, fmt.Errorf("node metadata registers service %q in unit %q, region %q, but the certificate is %s: a sidecar registers only as itself",
			reg.Service, reg.Unit, reg.Region, pid)
	}
	// Without a map yet the registration could not be committed (and
	// would be lost): the stream ends and the sidecar comes back.
	if err := store.CheckRegistration(g.r.store.Map(), *reg); err != nil {
		return nil, err
	}
	return reg, nil
}

func (g *registry) response(_ context.Context, _ int64, _ *discovery.DiscoveryRequest, resp *discovery.DiscoveryResponse) {
	n := 0
	for _, a := range resp.GetResources() {
		n += len(a.GetValue())
	}
	g.r.m.pushBytes.WithLabelValues(typeName(resp.GetTypeUrl())).Observe(float64(n))
}

func (g *registry) queue(c store.EndpointChange) {
	g.mu.Lock()
	g.pending = append(g.pending, c)
	g.mu.Unlock()
	select {
	case g.kick <- struct{}{}:
	default:
	}
}

// run commits the queued changes, in order and in batches, until ctx
// ends. A batch that fails (no leader yet, a leader change) is retried
// with backoff before anything queued after it.
func (g *registry) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for {
		g.mu.Lock()
		g.pending = compact(g.pending)
		n := min(len(g.pending), maxBatch)
		batch := slices.Clone(g.pending[:n])
		g.pending = slices.Delete(g.pending, 0, n)
		g.mu.Unlock()
		if len(batch) == 0 {
			select {
			case <-ctx.Done():
				return
			case <-g.kick:
				continue
			}
		}
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := g.r.commitEndpoints(actx, batch)
		cancel()
		if err == nil {
			backoff = 100 * time.Millisecond
			continue
		}
		g.mu.Lock()
		g.pending = append(batch, g.pending...)
		g.mu.Unlock()
		g.r.log.Warn("endpoint registrations not committed yet; retrying", "changes", len(batch), "in", backoff, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// maxBatch bounds the changes committed at once (one raft entry, one
// request to the leader).
const maxBatch = 100

// compact drops each registration whose deregistration of the same
// session follows it in the queue, with that deregistration: the stream
// came and went before either was committed.
func compact(q []store.EndpointChange) []store.EndpointChange {
	drop := make([]bool, len(q))
	for i, c := range q {
		if !c.Deregister || c.Purge {
			continue
		}
		for j := i - 1; j >= 0; j-- {
			o := q[j]
			if !drop[j] && !o.Deregister && !o.Purge && o.Session == c.Session && o.Address == c.Address && o.Transport == c.Transport {
				drop[i], drop[j] = true, true
				break
			}
		}
	}
	out := q[:0:0]
	for i, c := range q {
		if !drop[i] {
			out = append(out, c)
		}
	}
	return out
}

// typeName is the short name of a type URL for metrics and logs.
func typeName(url string) string {
	switch url {
	case resource.ClusterType:
		return "cluster"
	case resource.EndpointType:
		return "endpoint"
	case xdsapi.ShardMapType:
		return "shardmap"
	case xdsapi.LeaseType:
		return "lease"
	}
	return "other"
}
