package controlplane

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
)

// maxBody bounds an API request body; maxTopology a topology's.
const (
	maxBody     = 64 << 10
	maxTopology = 16 << 20
)

// Headers between replicas.
const (
	// forwardedHeader marks a write a follower forwarded to the leader, so
	// it is never forwarded twice.
	forwardedHeader = "X-Cellmesh-Forwarded-By"
	// leaderHeader names the replica that answered a write.
	leaderHeader = "X-Cellmesh-Leader"
)

// apiError is an API failure: its HTTP status and what to tell the caller.
type apiError struct {
	code int
	msg  string
}

func (e *apiError) Error() string { return e.msg }

func errorf(code int, format string, args ...any) *apiError {
	return &apiError{code: code, msg: fmt.Sprintf(format, args...)}
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		ae = &apiError{code: http.StatusInternalServerError, msg: err.Error()}
	}
	if ae.code == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="cellmesh"`)
	}
	writeJSON(w, ae.code, map[string]string{"error": ae.msg})
}

// handler is an API endpoint: it answers a value as JSON or an error.
type handler func(r *http.Request) (any, error)

// route is an API path: its handlers by method, and whether a follower
// forwards it to the leader.
type route struct {
	pattern string
	methods map[string]handler
	write   bool
}

func (r *Replica) routes() []route {
	return []route{
		{pattern: "/v1/topology", methods: map[string]handler{"GET": r.getTopology, "PUT": r.putTopology}, write: true},
		{pattern: "/v1/shards", methods: map[string]handler{"GET": r.getShards}},
		{pattern: "/v1/shards/{id}", methods: map[string]handler{"GET": r.getShard}},
		{pattern: "/v1/shards/{id}/move", methods: map[string]handler{"POST": r.postMove}, write: true},
		{pattern: "/v1/members", methods: map[string]handler{"GET": r.getMembers}},
		{pattern: "/v1/actions", methods: map[string]handler{"GET": r.getActions}},
		{pattern: "/v1/events", methods: map[string]handler{"GET": r.getEvents}},
		{pattern: "/v1/handoffs", methods: map[string]handler{"GET": r.getHandoffs}},
		{pattern: "/v1/drills", methods: map[string]handler{"GET": r.getDrills, "POST": r.postDrill}, write: true},
		{pattern: "/v1/drills/{id}", methods: map[string]handler{"GET": r.getDrill}},
		{pattern: "/v1/drills/{id}/abort", methods: map[string]handler{"POST": r.postDrillAbort}, write: true},
		{pattern: "/v1/replicas", methods: map[string]handler{"POST": r.postReplica}, write: true},
		{pattern: "/v1/replicas/{id}", methods: map[string]handler{"DELETE": r.deleteReplica}, write: true},
		{pattern: "/v1/internal/endpoints", methods: map[string]handler{"POST": r.postEndpoints}, write: true},
	}
}

func (r *Replica) apiHandler() http.Handler {
	mux := http.NewServeMux()
	for _, rt := range r.routes() {
		mux.Handle(rt.pattern, r.serveRoute(rt))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		r.finish(w, req, "unknown", nil, errorf(http.StatusNotFound, "no API at %s %s: see docs/controlplane.md", req.Method, req.URL.Path))
	})
	metrics := promhttp.HandlerFor(r.cfg.Registry, promhttp.HandlerOpts{})
	mux.Handle("/metrics", getOnly(metrics.ServeHTTP))
	mux.Handle("/healthz", getOnly(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	}))
	mux.Handle("/readyz", getOnly(r.readyz))
	mux.Handle("/{$}", getOnly(func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"service": "cellmesh control plane", "replica": r.cfg.ID, "api": "/v1/", "docs": "docs/controlplane.md"})
	}))
	return mux
}

// getOnly answers methods other than GET and HEAD with a JSON 405.
func getOnly(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			writeError(w, errorf(http.StatusMethodNotAllowed, "%s takes GET", req.URL.Path))
			return
		}
		h(w, req)
	})
}

// serveRoute authenticates, dispatches by method, forwards writes from a
// follower to the leader, and answers JSON.
func (r *Replica) serveRoute(rt route) http.Handler {
	var allow []string
	for m := range rt.methods {
		allow = append(allow, m)
	}
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if err := r.authorize(req); err != nil {
			r.finish(w, req, rt.pattern, nil, err)
			return
		}
		h, ok := rt.methods[req.Method]
		if !ok {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			r.finish(w, req, rt.pattern, nil, errorf(http.StatusMethodNotAllowed, "%s does not take %s; it takes %s", rt.pattern, req.Method, strings.Join(allow, ", ")))
			return
		}
		if rt.write && req.Method != http.MethodGet && !r.store.IsLeader() {
			r.forward(w, req, rt.pattern)
			return
		}
		limit := int64(maxBody)
		if rt.pattern == "/v1/topology" || rt.pattern == "/v1/internal/endpoints" {
			limit = maxTopology
		}
		req.Body = http.MaxBytesReader(w, req.Body, limit)
		v, err := h(req)
		if rt.write {
			w.Header().Set(leaderHeader, r.cfg.ID)
		}
		r.finish(w, req, rt.pattern, v, err)
	})
}

func (r *Replica) finish(w http.ResponseWriter, req *http.Request, pattern string, v any, err error) {
	code := http.StatusOK
	if err != nil {
		writeError(w, err)
		var ae *apiError
		if errors.As(err, &ae) {
			code = ae.code
		} else {
			code = http.StatusInternalServerError
		}
	} else if y, ok := v.(yamlBody); ok {
		w.Header().Set("Content-Type", "application/yaml")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(y)
	} else {
		writeJSON(w, code, v)
	}
	r.m.api.WithLabelValues(req.Method, pattern, strconv.Itoa(code)).Inc()
}

func (r *Replica) authorize(req *http.Request) error {
	if r.cfg.Token == "" {
		return nil // --insecure-dev
	}
	got, ok := strings.CutPrefix(req.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return errorf(http.StatusUnauthorized, "missing bearer token: send Authorization: Bearer <token> (cellmesh --token or CELLMESH_TOKEN)")
	}
	if subtle.ConstantTimeCompare([]byte(got), []byte(r.cfg.Token)) != 1 {
		return errorf(http.StatusUnauthorized, "wrong bearer token")
	}
	return nil
}

// forward sends a write to the leader and relays its answer, or explains
// why it cannot.
func (r *Replica) forward(w http.ResponseWriter, req *http.Request, pattern string) {
	if by := req.Header.Get(forwardedHeader); by != "" {
		r.finish(w, req, pattern, nil, errorf(http.StatusServiceUnavailable,
			"replica %s forwarded this write here, but %s is not the leader either (leadership is moving): retry in a moment", by, r.cfg.ID))
		return
	}
	target, err := r.leaderAPI()
	if err != nil {
		r.finish(w, req, pattern, nil, err)
		return
	}
	var failed error
	p := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(&url.URL{Scheme: "http", Host: target})
			pr.Out.Header.Set(forwardedHeader, r.cfg.ID)
		},
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) { failed = err },
	}
	req.Body = http.MaxBytesReader(w, req.Body, maxTopology)
	p.ServeHTTP(w, req)
	if failed != nil {
		r.finish(w, req, pattern, nil, errorf(http.StatusServiceUnavailable,
			"this replica (%s) is a follower and the leader's API at %s did not answer: %v; if the leader took the write before it failed, it may be committed: read the state before retrying", r.cfg.ID, target, failed))
		return
	}
	r.m.api.WithLabelValues(req.Method, pattern, "forwarded").Inc()
}

// leaderAPI is the API address of the leader, or a 503 saying why none is
// known.
func (r *Replica) leaderAPI() (string, error) {
	addr, id := r.store.Leader()
	if id == "" {
		return "", errorf(http.StatusServiceUnavailable,
			"replica %s knows no raft leader: it cannot reach a quorum of replicas (a partition or lost replicas); writes are refused until a quorum elects a leader", r.cfg.ID)
	}
	for _, rep := range r.store.State().Replicas {
		if rep.ID == id {
			return rep.API, nil
		}
	}
	return "", errorf(http.StatusServiceUnavailable, "the leader is %s (raft %s), whose API address is not recorded yet: retry in a moment", id, addr)
}

// leaderWrite commits cmd on this replica, the leader, mapping the store's
// errors to API errors.
func (r *Replica) leaderWrite(ctx context.Context, cmd store.Command) (*routing.ShardMap, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	m, err := r.store.Apply(ctx, cmd)
	var refused *store.RefusedError
	var nl *store.ErrNotLeader
	switch {
	case err == nil:
		return m, nil
	case errors.As(err, &refused):
		return nil, errorf(http.StatusConflict, "%s", refused.Reason)
	case errors.As(err, &nl):
		return nil, errorf(http.StatusServiceUnavailable, "%v (if this replica lost its leadership while committing, the change may still have been committed by the next leader: read the state before retrying)", nl)
	}
	return nil, errorf(http.StatusServiceUnavailable, "not confirmed as committed (no quorum answered in time?): %v; read the state before retrying", err)
}

func decodeBody(req *http.Request, v any) error {
	data, err := io.ReadAll(req.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errorf(http.StatusRequestEntityTooLarge, "request body larger than %d bytes", maxBody)
		}
		return errorf(http.StatusBadRequest, "read the body: %v", err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return errorf(http.StatusBadRequest, "empty body: want a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "body is not the JSON this call takes: %v", err)
	}
	if dec.More() {
		return errorf(http.StatusBadRequest, "body holds more than one JSON value")
	}
	return nil
}

func (r *Replica) currentMap() (*routing.ShardMap, error) {
	m := r.store.Map()
	if m == nil {
		return nil, errorf(http.StatusServiceUnavailable, "no topology yet: start a replica with --topology FILE")
	}
	return m, nil
}

// yamlBody is an answer sent as YAML.
type yamlBody []byte

// getTopology answers the map as cellmesh.v1.ShardMap JSON, or with
// ?format=yaml as a topology file (to edit, plan and apply again).
func (r *Replica) getTopology(req *http.Request) (any, error) {
	m, err := r.currentMap()
	if err != nil {
		return nil, err
	}
	switch f := req.URL.Query().Get("format"); f {
	case "yaml":
		data, err := topofile.Encode(m.Topology())
		if err != nil {
			return nil, err
		}
		return yamlBody(data), nil
	case "", "json":
	default:
		return nil, errorf(http.StatusBadRequest, "format %q: want json or yaml", f)
	}
	data, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(xdsapi.FromTopology(m.Topology()))
	if err != nil {
		return nil, err
	}
	return json.RawMessage(data), nil
}

// putTopology commits a topology file (YAML or JSON, the format of
// routing/topofile) if it is a valid successor of the current map.
func (r *Replica) putTopology(req *http.Request) (any, error) {
	data, err := io.ReadAll(req.Body)
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errorf(http.StatusRequestEntityTooLarge, "topology larger than %d bytes", maxTopology)
		}
		return nil, errorf(http.StatusBadRequest, "read the body: %v", err)
	}
	t, err := topofile.Parse(data)
	if err != nil {
		return nil, errorf(http.StatusBadRequest, "topology: %v", err)
	}
	if err := t.Validate(); err != nil {
		return nil, errorf(http.StatusBadRequest, "topology: %v", err)
	}
	who := "api"
	if by := req.Header.Get(forwardedHeader); by != "" {
		who = "api via " + by
	}
	m, err := r.leaderWrite(req.Context(), store.Command{Op: store.OpSetTopology, Topology: t, Who: who, At: time.Now().UTC()})
	if err != nil {
		return nil, err
	}
	idx := r.store.State().Index
	r.waitPublished(req.Context(), idx)
	r.log.Info("topology applied", "version", m.Version(), "by", who)
	return map[string]uint64{"version": m.Version(), "index": idx}, nil
}

// Shard is one assignment as the API shows it.
type Shard struct {
	Shard    int      `json:"shard"`
	Unit     string   `json:"unit"`
	Region   string   `json:"region"`
	Epoch    uint64   `json:"epoch"`
	State    string   `json:"state"`
	Standbys []string `json:"standbys"`
}

// Shards is the answer of GET /v1/shards.
type Shards struct {
	Version uint64  `json:"version"`
	Shards  []Shard `json:"shards"`
}

func shardOf(o routing.Owner) Shard {
	return Shard{Shard: o.Shard, Unit: o.Unit, Region: o.Region, Epoch: o.Epoch, State: string(o.State), Standbys: append([]string{}, o.Standbys...)}
}

func (r *Replica) getShards(req *http.Request) (any, error) {
	m, err := r.currentMap()
	if err != nil {
		return nil, err
	}
	q := req.URL.Query()
	for k := range q {
		if k != "unit" && k != "region" && k != "state" {
			return nil, errorf(http.StatusBadRequest, "unknown query parameter %q: filters are unit, region and state", k)
		}
	}
	unit, region, state := q.Get("unit"), q.Get("region"), q.Get("state")
	if _, ok := m.Unit(unit); unit != "" && !ok {
		return nil, errorf(http.StatusNotFound, "unit %q is not in topology version %d", unit, m.Version())
	}
	if region != "" && !hasRegion(m, region) {
		return nil, errorf(http.StatusNotFound, "region %q is not in topology version %d", region, m.Version())
	}
	if state != "" && state != string(routing.StateServing) && state != string(routing.StateDraining) && state != string(routing.StateBlocked) {
		return nil, errorf(http.StatusBadRequest, "state %q: want serving, draining or blocked", state)
	}
	out := Shards{Version: m.Version(), Shards: []Shard{}}
	for _, a := range m.Topology().Assignments {
		o, err := m.Lookup(a.Shard)
		if err != nil {
			continue
		}
		if (unit == "" || o.Unit == unit) && (region == "" || o.Region == region) && (state == "" || string(o.State) == state) {
			out.Shards = append(out.Shards, shardOf(o))
		}
	}
	return out, nil
}

func hasRegion(m *routing.ShardMap, region string) bool {
	for _, rg := range m.Topology().Regions {
		if rg.Name == region {
			return true
		}
	}
	return false
}

// shardParam reads the {id} of a shard path: a shard of the map, or -1
// ("global") for the gzone writer.
func shardParam(req *http.Request, m *routing.ShardMap) (routing.Owner, error) {
	raw := req.PathValue("id")
	id, err := strconv.Atoi(raw)
	if raw == "global" {
		id, err = -1, nil
	}
	if err != nil {
		return routing.Owner{}, errorf(http.StatusBadRequest, "shard %q: want a shard number 0..%d, or global", raw, m.Shards()-1)
	}
	o, err := m.Lookup(id)
	if err != nil {
		return routing.Owner{}, errorf(http.StatusNotFound, "%v", err)
	}
	return o, nil
}

func (r *Replica) getShard(req *http.Request) (any, error) {
	m, err := r.currentMap()
	if err != nil {
		return nil, err
	}
	o, err := shardParam(req, m)
	if err != nil {
		return nil, err
	}
	return shardOf(o), nil
}

// MoveRequest is the body of POST /v1/shards/{id}/move.
type MoveRequest struct {
	To string `json:"to"`
	// Epoch, when set, is the epoch the caller read: the move happens only
	// if the shard is still at it.
	Epoch uint64 `json:"epoch,omitempty"`
	// AcceptDataLoss moves the shard even when the handoff check fails
	// (its standby behind): the gap is recorded in the handoff.
	AcceptDataLoss bool `json:"accept_data_loss,omitempty"`
}

// MoveResult is the answer of a move.
type MoveResult struct {
	Shard   int    `json:"shard"`
	From    string `json:"from"`
	To      string `json:"to"`
	Epoch   uint64 `json:"epoch"`
	Version uint64 `json:"version"`
	// Index is the raft index that committed it; the leader had
	// published it over xDS when it answered.
	Index uint64 `json:"index"`
	// Handoff is the record of the handoff (write pause, gap accepted).
	Handoff *store.Handoff `json:"handoff,omitempty"`
}

func (r *Replica) postMove(req *http.Request) (any, error) {
	m, err := r.currentMap()
	if err != nil {
		return nil, err
	}
	o, err := shardParam(req, m)
	if err != nil {
		return nil, err
	}
	var body MoveRequest
	if err := decodeBody(req, &body); err != nil {
		return nil, err
	}
	if body.To == "" {
		return nil, errorf(http.StatusBadRequest, `"to" is required: the unit to move %s to`, routing.ShardName(o.Shard))
	}
	if _, ok := m.Unit(body.To); !ok {
		return nil, errorf(http.StatusBadRequest, "unit %q is not in topology version %d", body.To, m.Version())
	}
	epoch := body.Epoch
	if epoch == 0 {
		epoch = o.Epoch
	}
	who := "api"
	if by := req.Header.Get(forwardedHeader); by != "" {
		who = "api via " + by
	}
	h, err := r.orch.planned(req.Context(), o.Shard, body.To, epoch, body.AcceptDataLoss, who)
	if err != nil {
		return nil, err
	}
	next := r.store.Map()
	idx := h.Index
	no, _ := next.Lookup(o.Shard)
	r.log.Info("shard moved", "shard", o.Shard, "from", o.Unit, "to", no.Unit, "epoch", no.Epoch, "version", next.Version(), "by", who,
		"write_pause_seconds", h.WritePauseSeconds, "gap", h.Gap)
	return MoveResult{Shard: o.Shard, From: o.Unit, To: no.Unit, Epoch: no.Epoch, Version: next.Version(), Index: idx, Handoff: h}, nil
}

// waitPublished waits (briefly) until the xDS server serves index.
func (r *Replica) waitPublished(ctx context.Context, index uint64) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	for r.xds.Version() < index {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Millisecond):
		}
	}
}

// Member is a control-plane replica as GET /v1/members shows it.
type Member struct {
	ID     string `json:"id"`
	Region string `json:"region,omitempty"`
	Raft   string `json:"raft"`
	API    string `json:"api,omitempty"`
	XDS    string `json:"xds,omitempty"`
	Voter  bool   `json:"voter"`
	Leader bool   `json:"leader"`
}

// Members is the answer of GET /v1/members.
type Members struct {
	Replica   string               `json:"replica"`
	Leader    string               `json:"leader"`
	Index     uint64               `json:"index"`
	Replicas  []Member             `json:"replicas"`
	Endpoints []store.Registration `json:"endpoints"`
	Leases    []LeaseView          `json:"leases"`
	// Gossip is this replica's view of the gossip pool.
	Gossip GossipView `json:"gossip"`
}

// GossipView is the health of every member, unit and region as one
// replica's gossip sees it (the leader's is the one failover acts on).
type GossipView struct {
	SeenBy  string                  `json:"seen_by"`
	Enabled bool                    `json:"enabled"`
	Address string                  `json:"address,omitempty"`
	Members []failover.MemberHealth `json:"members"`
	Units   []failover.UnitHealth   `json:"units"`
	Regions []failover.RegionHealth `json:"regions"`
}

// LeaseView is a unit's lease as the API shows it: the last grant and
// when it ends on the leader's clock.
type LeaseView struct {
	Unit       string    `json:"unit"`
	Seq        uint64    `json:"seq"`
	TTLSeconds float64   `json:"ttl_seconds"`
	GrantedAt  time.Time `json:"granted_at"`
	EndsAt     time.Time `json:"ends_at"`
}

func (r *Replica) getMembers(*http.Request) (any, error) {
	conf, err := r.store.Configuration()
	if err != nil {
		return nil, errorf(http.StatusServiceUnavailable, "raft configuration: %v", err)
	}
	st := r.store.State()
	_, leader := r.store.Leader()
	out := Members{Replica: r.cfg.ID, Leader: leader, Index: st.Index, Replicas: []Member{}, Endpoints: append([]store.Registration{}, st.Endpoints...), Leases: []LeaseView{}}
	for _, l := range st.Leases {
		out.Leases = append(out.Leases, LeaseView{Unit: l.Unit, Seq: l.Seq, TTLSeconds: l.TTL.Seconds(), GrantedAt: l.GrantedAt, EndsAt: l.Ends()})
	}
	v := r.health.View()
	out.Gossip = GossipView{SeenBy: r.cfg.ID, Enabled: r.gossip != nil, Members: nonNil(v.Members), Units: nonNil(v.Units), Regions: nonNil(v.Regions)}
	if r.gossip != nil {
		out.Gossip.Address = r.gossip.Addr()
	}
	for _, s := range conf {
		mb := Member{ID: s.ID, Raft: s.Address, Voter: s.Voter, Leader: s.ID == leader}
		for _, rep := range st.Replicas {
			if rep.ID == s.ID {
				mb.Region, mb.API, mb.XDS = rep.Region, rep.API, rep.XDS
			}
		}
		out.Replicas = append(out.Replicas, mb)
	}
	return out, nil
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// getEvents answers the health event log of this replica's gossip view,
// after the sequence number ?after= (default 0: every event kept).
func (r *Replica) getEvents(req *http.Request) (any, error) {
	var after uint64
	if a := req.URL.Query().Get("after"); a != "" {
		n, err := strconv.ParseUint(a, 10, 64)
		if err != nil {
			return nil, errorf(http.StatusBadRequest, "after=%q: want a sequence number", a)
		}
		after = n
	}
	return map[string]any{"seen_by": r.cfg.ID, "events": nonNil(r.health.Events(after))}, nil
}

// getHandoffs answers the orchestrator's last handoffs, newest last.
func (r *Replica) getHandoffs(*http.Request) (any, error) {
	return map[string]any{"handoffs": nonNil(r.store.State().Handoffs)}, nil
}

func (r *Replica) getActions(*http.Request) (any, error) {
	acts := r.store.Actions()
	if acts == nil {
		acts = []store.Action{}
	}
	return map[string]any{"actions": acts}, nil
}

// JoinRequest is the body of POST /v1/replicas: a replica asking to
// become a voter.
type JoinRequest struct {
	ID     string `json:"id"`
	Region string `json:"region,omitempty"`
	Raft   string `json:"raft"`
	API    string `json:"api"`
	XDS    string `json:"xds"`
}

func (r *Replica) postReplica(req *http.Request) (any, error) {
	var body JoinRequest
	if err := decodeBody(req, &body); err != nil {
		return nil, err
	}
	if err := meshtls.ValidateSegment(body.ID); err != nil {
		return nil, errorf(http.StatusBadRequest, "id %q: %v", body.ID, err)
	}
	for _, a := range []struct{ name, v string }{{"raft", body.Raft}, {"api", body.API}, {"xds", body.XDS}} {
		if _, port, err := net.SplitHostPort(a.v); err != nil || port == "0" || port == "" {
			return nil, errorf(http.StatusBadRequest, "%s address %q: want host:port", a.name, a.v)
		}
	}
	// A voter that cannot be reached would take the quorum with it: one
	// unreachable replica of two stops every write.
	if c, err := net.DialTimeout("tcp", body.Raft, 2*time.Second); err != nil {
		return nil, errorf(http.StatusServiceUnavailable, "cannot reach the raft address %s of %s from the leader %s: %v; nothing changed (start the replica first, check --raft-advertise)", body.Raft, body.ID, r.cfg.ID, err)
	} else {
		c.Close()
	}
	if err := r.store.AddVoter(body.ID, body.Raft); err != nil {
		return nil, errorf(http.StatusServiceUnavailable, "add %s (raft %s) as a voter: %v", body.ID, body.Raft, err)
	}
	rep := store.Replica{ID: body.ID, Region: body.Region, Raft: body.Raft, API: body.API, XDS: body.XDS}
	if _, err := r.leaderWrite(req.Context(), store.Command{Op: store.OpReplica, Replica: &rep, Who: "replica " + body.ID + " (join)", At: time.Now().UTC()}); err != nil {
		return nil, err
	}
	r.log.Info("replica joined", "id", body.ID, "raft", body.Raft, "api", body.API)
	return r.getMembers(req)
}

func (r *Replica) deleteReplica(req *http.Request) (any, error) {
	id := req.PathValue("id")
	conf, err := r.store.Configuration()
	if err != nil {
		return nil, errorf(http.StatusServiceUnavailable, "raft configuration: %v", err)
	}
	found, voters := false, 0
	for _, s := range conf {
		found = found || s.ID == id
		if s.Voter {
			voters++
		}
	}
	if !found {
		return nil, errorf(http.StatusNotFound, "replica %q is not in the raft configuration", id)
	}
	if voters <= 1 {
		return nil, errorf(http.StatusConflict, "replica %s is the last voter: removing it would leave no control plane", id)
	}
	if err := r.store.RemoveServer(id); err != nil {
		return nil, errorf(http.StatusServiceUnavailable, "remove %s: %v", id, err)
	}
	rep := store.Replica{ID: id}
	if id != r.cfg.ID { // a removed leader steps down; the next one tidies
		if _, err := r.leaderWrite(req.Context(), store.Command{Op: store.OpForgetReplica, Replica: &rep, Who: "api", At: time.Now().UTC()}); err != nil {
			return nil, err
		}
	}
	r.log.Info("replica removed", "id", id)
	return map[string]string{"removed": id}, nil
}

// postEndpoints commits registrations another replica queued.
func (r *Replica) postEndpoints(req *http.Request) (any, error) {
	var body []store.EndpointChange
	if err := decodeBody(req, &body); err != nil {
		return nil, err
	}
	who := "replica " + req.Header.Get(forwardedHeader)
	if _, err := r.leaderWrite(req.Context(), store.Command{Op: store.OpEndpoints, Endpoints: body, Who: who, At: time.Now().UTC()}); err != nil {
		return nil, err
	}
	return map[string]int{"changes": len(body)}, nil
}

// commitEndpoints commits registration changes: on the leader directly,
// from a follower through the leader's API.
func (r *Replica) commitEndpoints(ctx context.Context, batch []store.EndpointChange) error {
	if r.store.IsLeader() {
		_, err := r.leaderWrite(ctx, store.Command{Op: store.OpEndpoints, Endpoints: batch, Who: "replica " + r.cfg.ID, At: time.Now().UTC()})
		return err
	}
	target, err := r.leaderAPI()
	if err != nil {
		return err
	}
	return r.call(ctx, target, "POST", "/v1/internal/endpoints", batch)
}

// call sends a JSON request to another replica's API.
func (r *Replica) call(ctx context.Context, addr, method, path string, body any) error {
	data, err := json.Marshal(body)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, method, apiURL(addr)+path, bytes.NewReader(data))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set(forwardedHeader, r.cfg.ID)
	if r.cfg.Token != "" {
		req.Header.Set("Authorization", "Bearer "+r.cfg.Token)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		_ = json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(&e)
		return fmt.Errorf("%s %s: %s: %s", method, addr, resp.Status, e.Error)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
	return nil
}

// apiURL turns host:port or a URL into a base URL.
func apiURL(addr string) string {
	if strings.Contains(addr, "://") {
		return strings.TrimSuffix(addr, "/")
	}
	return "http://" + addr
}

// join asks the replicas of cfg.Join, in turn, to add this one as a voter,
// until one accepts.
func (r *Replica) join(ctx context.Context) {
	me := r.self()
	body := JoinRequest{ID: me.ID, Region: me.Region, Raft: me.Raft, API: me.API, XDS: me.XDS}
	backoff := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		for _, addr := range r.cfg.Join {
			cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			err := r.call(cctx, addr, "POST", "/v1/replicas", body)
			cancel()
			if err == nil {
				r.log.Info("joined the control plane", "via", addr)
				return
			}
			if ctx.Err() != nil {
				return
			}
			r.log.Warn("join not accepted yet; retrying", "via", addr, "attempt", attempt, "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// readyz: a replica is ready when it has a map and knows a leader.
func (r *Replica) readyz(w http.ResponseWriter, _ *http.Request) {
	_, leader := r.store.Leader()
	switch {
	case r.store.Map() == nil:
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no topology yet"})
	case leader == "":
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no raft leader known: no quorum reachable; serving the last state over xDS"})
	default:
		writeJSON(w, http.StatusOK, map[string]any{"status": "ready", "leader": leader, "index": r.store.State().Index})
	}
}
