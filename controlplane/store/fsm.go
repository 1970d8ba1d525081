package store

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/hashicorp/raft"
)

// Ops of a Command.
const (
	// OpSetTopology replaces the topology; it must be a valid successor of
	// the current one (routing.ShardMap.CheckSuccessor).
	OpSetTopology = "set-topology"
	// OpMove makes To the primary of Shard if its epoch is still Epoch:
	// epoch+1, the old primary first among the standbys, version+1.
	OpMove = "move"
	// OpEndpoints applies Endpoints in order: a registration records a
	// sidecar connected to a replica's xDS server, replacing any record of
	// the same address and transport; a deregistration drops the record
	// of its address and transport only if it is still of the same
	// session (a sidecar that moved to another replica has a newer
	// session, which stays). A registration the map cannot route to is
	// skipped.
	OpEndpoints = "endpoints"
	// OpReplica records where Replica serves its API and xDS.
	OpReplica = "replica"
	// OpForgetReplica drops the record of replica Replica.ID.
	OpForgetReplica = "forget-replica"
	// OpHealth marks down the endpoints whose keys (transport://address)
	// are in Down, draining those in Draining, and every other endpoint
	// up: the leader's gossip view of which registered sidecars are dead
	// and which left (a clean stop). Such an endpoint stays registered
	// but is served out of load balancing (UNHEALTHY, DRAINING) and gives
	// its unit no lease.
	OpHealth = "health"
	// OpState sets shard Shard's state to State if its epoch is still
	// Epoch: draining for a planned handoff, blocked when a handoff check
	// failed, serving again after an abort or an override.
	OpState = "state"
	// OpPlanMove applies Move, one move of a routing plan (a new primary
	// at epoch+1, new standbys, or both), if the shard's primary and epoch
	// are still the move's From and FromEpoch; the shard serves after it.
	OpPlanMove = "plan-move"
	// OpDrill records Drill (replacing the record of the same ID): the
	// drills and their reports, kept by the control plane.
	OpDrill = "drill"
	// OpHandoff records Handoff (replacing the record of the same ID):
	// what the orchestrator did, for the API and a new leader.
	OpHandoff = "handoff"
	// OpGrant grants the units of Grants a lease of TTL from At (the
	// leader's clock): each one's Seq rises. Units the map lacks are
	// skipped.
	OpGrant = "grant"
)

// Lease is a unit's right to accept writes for its shards: granted by the
// leader, renewed while the unit's sidecars are connected. The sidecars
// count it from its receipt on their own clock; a new leader knows from
// GrantedAt when the last grant may end.
type Lease struct {
	Unit      string        `json:"unit"`
	Seq       uint64        `json:"seq"`
	TTL       time.Duration `json:"ttl"`
	GrantedAt time.Time     `json:"granted_at"`
}

// Ends is when the lease ends at the latest, on the granting leader's clock.
func (l Lease) Ends() time.Time { return l.GrantedAt.Add(l.TTL) }

// Registration is a sidecar registered as an endpoint of its service in
// its unit, through the xDS stream it holds with a replica.
type Registration struct {
	Service   string    `json:"service"`
	Unit      string    `json:"unit"`
	Region    string    `json:"region"`
	Address   string    `json:"address"`
	Transport string    `json:"transport"`
	Node      string    `json:"node"`
	Via       string    `json:"via"`
	Session   string    `json:"session"`
	Since     time.Time `json:"since"`
	// Down: gossip finds the sidecar dead (OpHealth).
	Down bool `json:"down,omitempty"`
	// Draining: the sidecar left the gossip pool (a clean stop: it
	// finishes what it has in flight).
	Draining bool `json:"draining,omitempty"`
}

// EndpointChange registers or deregisters an endpoint.
type EndpointChange struct {
	Deregister bool `json:"deregister,omitempty"`
	// Purge drops every record registered via Registration.Via whose
	// session does not start with Registration.Session: a restarted
	// replica drops the sessions of its earlier life.
	Purge        bool `json:"purge,omitempty"`
	Registration `json:"registration"`
}

// Key names an endpoint in OpHealth: transport://address.
func (r Registration) Key() string { return r.Transport + "://" + r.Address }

// Replica is where a control-plane replica serves: its raft, API and xDS
// addresses.
type Replica struct {
	ID     string `json:"id"`
	Region string `json:"region,omitempty"`
	Raft   string `json:"raft"`
	API    string `json:"api"`
	XDS    string `json:"xds"`
}

// Command is one change of the state, with who asked for it and when.
type Command struct {
	Op        string            `json:"op"`
	Topology  *routing.Topology `json:"topology,omitempty"`
	Shard     int               `json:"shard,omitempty"`
	To        string            `json:"to,omitempty"`
	Epoch     uint64            `json:"epoch,omitempty"`
	Endpoints []EndpointChange  `json:"endpoints,omitempty"`
	Replica   *Replica          `json:"replica,omitempty"`
	Grants    []string          `json:"grants,omitempty"`
	Down      []string          `json:"down,omitempty"`
	Draining  []string          `json:"draining,omitempty"`
	State     routing.State     `json:"state,omitempty"`
	Move      *routing.Move     `json:"move,omitempty"`
	Handoff   *Handoff          `json:"handoff,omitempty"`
	Drill     *Drill            `json:"drill,omitempty"`
	// LeaseMargin, on a plan-move that changes the primary, requires the
	// old primary's lease to have ended LeaseMargin before At (I3).
	LeaseMargin time.Duration `json:"lease_margin,omitempty"`
	TTL         time.Duration `json:"ttl,omitempty"`
	Who         string        `json:"who"`
	At          time.Time     `json:"at"`
}

// Action is an applied command as the operator log keeps it.
type Action struct {
	Index   uint64    `json:"index"`
	At      time.Time `json:"at"`
	Who     string    `json:"who"`
	What    string    `json:"what"`
	Version uint64    `json:"version"`
}

// maxActions bounds the operator log kept in the state.
const maxActions = 1000

// RefusedError: the state machine refused a command; nothing changed.
type RefusedError struct{ Reason string }

func (e *RefusedError) Error() string { return "refused: " + e.Reason }

// State is the replicated state at one raft index. It is immutable: a
// change makes a new State.
type State struct {
	// Index is the raft index of the last change (0 before any): every
	// replica that applied the same log has the same Index for the same
	// state, so it versions what the replicas serve.
	Index uint64
	// Map is the shard map, nil before the first topology.
	Map *routing.ShardMap
	// Endpoints are the registered sidecars, by transport and address.
	Endpoints []Registration
	// Replicas are the recorded control-plane replicas, by ID.
	Replicas []Replica
	// Leases are the units' leases, by unit.
	Leases []Lease
	// Handoffs are the last handoffs, oldest first (at most maxHandoffs).
	Handoffs []Handoff
	// Drills are the last drills with their reports, oldest first (at
	// most maxDrills).
	Drills []Drill
}

// Drill is an operator's drill (an evacuation, a restore) and its report.
type Drill struct {
	ID   string `json:"id"`
	Kind string `json:"kind"`
	// Region or Unit is the drill's target.
	Region string `json:"region,omitempty"`
	Unit   string `json:"unit,omitempty"`
	Who    string `json:"who"`
	// Phase: running, done, aborted, failed.
	Phase  string `json:"phase"`
	Reason string `json:"reason,omitempty"`
	// Started and Ended on the leader's clock.
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended,omitzero"`
	// Total shards to move; Moved so far; the write pause of the moves.
	Total                int     `json:"total"`
	Moved                int     `json:"moved"`
	WritePauseMaxSeconds float64 `json:"write_pause_max_seconds"`
	// Rules are the safety rules evaluated on the drill's plan.
	Rules  []routing.RuleResult `json:"rules"`
	Shards []DrillShard         `json:"shards"`
	Events []DrillEvent         `json:"events"`
}

// DrillShard is one shard's move in a drill: its handoff and its RPO
// check (the standby held everything the primary committed: Gap 0).
type DrillShard struct {
	Shard int    `json:"shard"`
	From  string `json:"from"`
	To    string `json:"to"`
	// Phase: waiting, done, failed, skipped.
	Phase             string    `json:"phase"`
	Error             string    `json:"error,omitempty"`
	Epoch             uint64    `json:"epoch,omitempty"`
	WritePauseSeconds float64   `json:"write_pause_seconds,omitempty"`
	RPOOK             bool      `json:"rpo_ok"`
	Gap               uint64    `json:"gap,omitempty"`
	Started           time.Time `json:"started,omitzero"`
	Ended             time.Time `json:"ended,omitzero"`
}

// DrillEvent is a line of a drill's timeline.
type DrillEvent struct {
	At  time.Time `json:"at"`
	Msg string    `json:"msg"`
}

// maxDrills bounds the drill records kept in the state.
const maxDrills = 100

// upsert returns a copy of records with rec last, in place of the record of
// the same id, keeping at most the last limit.
func upsert[T any](records []T, rec T, id func(T) string, limit int) []T {
	out := slices.DeleteFunc(slices.Clone(records), func(r T) bool { return id(r) == id(rec) })
	out = append(out, rec)
	if len(out) > limit {
		out = out[len(out)-limit:]
	}
	return out
}

// Handoff is one shard's move by the orchestrator.
type Handoff struct {
	ID    string `json:"id"`
	Shard int    `json:"shard"`
	// Kind is planned (an operator's move, a drill) or unplanned (its
	// primary's unit was lost).
	Kind string `json:"kind"`
	From string `json:"from"`
	To   string `json:"to"`
	// FromEpoch is the shard's epoch when it began; Epoch the new one once
	// done.
	FromEpoch uint64 `json:"from_epoch"`
	Epoch     uint64 `json:"epoch,omitempty"`
	// Index is the raft index that committed the move.
	Index uint64 `json:"index,omitempty"`
	// Phase: draining, checking, done, blocked, aborted, failed.
	Phase  string `json:"phase"`
	Reason string `json:"reason,omitempty"`
	// Started and Ended on the leader's clock; Detected, for an unplanned
	// one, when gossip found the unit down.
	Started  time.Time `json:"started"`
	Detected time.Time `json:"detected,omitzero"`
	Ended    time.Time `json:"ended,omitzero"`
	// WritePauseSeconds: from draining to the new primary's map pushed.
	WritePauseSeconds float64 `json:"write_pause_seconds,omitempty"`
	// AcceptDataLoss: an operator overrode the check; Gap is how many
	// entries the standby lacked (last committed seen minus its applied).
	AcceptDataLoss bool   `json:"accept_data_loss,omitempty"`
	Gap            uint64 `json:"gap,omitempty"`
}

// maxHandoffs bounds the handoff records kept in the state.
const maxHandoffs = 500

// fsm is the raft state machine. Apply runs on one goroutine (raft's);
// readers use cur and actions.
type fsm struct {
	cur     atomic.Pointer[State]
	changed chan struct{} // signalled after every change, capacity 1
	mu      sync.Mutex
	acts    []Action
}

func newFSM() *fsm {
	f := &fsm{changed: make(chan struct{}, 1)}
	f.cur.Store(&State{})
	return f
}

func (f *fsm) actions() []Action {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.acts)
}

func (f *fsm) notify() {
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

func (f *fsm) Apply(l *raft.Log) any {
	var cmd Command
	if err := json.Unmarshal(l.Data, &cmd); err != nil {
		return &RefusedError{Reason: "undecodable command: " + err.Error()}
	}
	cur := f.cur.Load()
	next, what, err := f.next(cur, cmd)
	if err != nil {
		return err
	}
	if next == nil { // nothing to change
		return cur.Map
	}
	next.Index = l.Index
	f.cur.Store(next)
	if what != "" {
		var version uint64
		if next.Map != nil {
			version = next.Map.Version()
		}
		f.mu.Lock()
		f.acts = append(f.acts, Action{Index: l.Index, At: cmd.At, Who: cmd.Who, What: what, Version: version})
		if len(f.acts) > maxActions {
			f.acts = slices.Clone(f.acts[len(f.acts)-maxActions:])
		}
		f.mu.Unlock()
	}
	f.notify()
	return next.Map
}

// next computes the state a command leads to (nil: no change) and what
// the operator log says of it ("": not an operator action), or why it is
// refused.
func (f *fsm) next(cur *State, cmd Command) (*State, string, error) {
	with := func(m *routing.ShardMap) *State {
		n := *cur
		n.Map = m
		return &n
	}
	switch cmd.Op {
	case OpSetTopology, OpMove:
		m, what, err := nextMap(cur.Map, cmd)
		if err != nil {
			return nil, "", err
		}
		// Registrations and leases of units the new map no longer has are
		// dropped.
		n := with(m)
		n.Endpoints = slices.DeleteFunc(slices.Clone(cur.Endpoints), func(r Registration) bool {
			_, ok := m.Unit(r.Unit)
			return !ok
		})
		n.Leases = slices.DeleteFunc(slices.Clone(cur.Leases), func(l Lease) bool {
			_, ok := m.Unit(l.Unit)
			return !ok
		})
		return n, what, nil
	case OpEndpoints:
		eps := slices.Clone(cur.Endpoints)
		changed := false
		for _, c := range cmd.Endpoints {
			r := c.Registration
			i := slices.IndexFunc(eps, func(o Registration) bool { return o.Key() == r.Key() })
			switch {
			case c.Purge:
				n := len(eps)
				eps = slices.DeleteFunc(eps, func(o Registration) bool {
					return o.Via == r.Via && !strings.HasPrefix(o.Session, r.Session)
				})
				changed = changed || len(eps) != n
			case c.Deregister && i >= 0 && eps[i].Session == r.Session:
				eps = slices.Delete(eps, i, i+1)
				changed = true
			case c.Deregister:
			case CheckRegistration(cur.Map, r) != nil:
			case i >= 0:
				eps[i], changed = r, true
			default:
				eps, changed = append(eps, r), true
			}
		}
		if !changed {
			return nil, "", nil
		}
		slices.SortFunc(eps, func(a, b Registration) int { return strings.Compare(a.Key(), b.Key()) })
		n := with(cur.Map)
		n.Endpoints = eps
		return n, "", nil
	case OpHealth:
		eps := slices.Clone(cur.Endpoints)
		changed := false
		for i := range eps {
			down := slices.Contains(cmd.Down, eps[i].Key())
			draining := !down && slices.Contains(cmd.Draining, eps[i].Key())
			if eps[i].Down != down || eps[i].Draining != draining {
				eps[i].Down, eps[i].Draining, changed = down, draining, true
			}
		}
		if !changed {
			return nil, "", nil
		}
		n := with(cur.Map)
		n.Endpoints = eps
		return n, "", nil
	case OpState:
		if cur.Map == nil {
			return nil, "", &RefusedError{Reason: "no topology yet"}
		}
		owner, err := cur.Map.Lookup(cmd.Shard)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		switch {
		case owner.Epoch != cmd.Epoch:
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is at epoch %d, not %d: read it again", routing.ShardName(cmd.Shard), owner.Epoch, cmd.Epoch)}
		case cmd.State != routing.StateServing && cmd.State != routing.StateDraining && cmd.State != routing.StateBlocked:
			return nil, "", &RefusedError{Reason: fmt.Sprintf("state %q: want serving, draining or blocked", cmd.State)}
		case owner.State == cmd.State:
			return nil, "", nil
		}
		t := cur.Map.Topology()
		t.Version++
		for i := range t.Assignments {
			if t.Assignments[i].Shard == cmd.Shard {
				t.Assignments[i].State = cmd.State
			}
		}
		m, err := routing.Compile(t)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		return with(m), fmt.Sprintf("%s %s at epoch %d", routing.ShardName(cmd.Shard), cmd.State, cmd.Epoch), nil
	case OpPlanMove:
		if cur.Map == nil || cmd.Move == nil {
			return nil, "", &RefusedError{Reason: "plan-move needs a topology and a move"}
		}
		mv := *cmd.Move
		if cmd.LeaseMargin > 0 && mv.PrimaryChange() {
			for _, l := range cur.Leases {
				if l.Unit == mv.From && cmd.At.Before(l.Ends().Add(cmd.LeaseMargin)) {
					return nil, "", &RefusedError{Reason: fmt.Sprintf("unit %s's lease ends at %s, plus a margin of %s: %s moves after that", mv.From, l.Ends().Format(time.RFC3339Nano), cmd.LeaseMargin, routing.ShardName(mv.Shard))}
				}
			}
		}
		if _, ok := cur.Map.Unit(mv.To); !ok {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("unit %q is not in topology version %d", mv.To, cur.Map.Version())}
		}
		t, err := cur.Map.Apply(&routing.Plan{Version: cur.Map.Version(), Moves: []routing.Move{mv}})
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		for i := range t.Assignments {
			if t.Assignments[i].Shard == mv.Shard {
				t.Assignments[i].State = routing.StateServing
			}
		}
		m, err := routing.Compile(t)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		what := fmt.Sprintf("%s standbys %v", routing.ShardName(mv.Shard), mv.Standbys)
		if mv.PrimaryChange() {
			what = fmt.Sprintf("move %s from %s to %s, epoch %d", routing.ShardName(mv.Shard), mv.From, mv.To, mv.FromEpoch+1)
		}
		return with(m), what, nil
	case OpDrill:
		if cmd.Drill == nil || cmd.Drill.ID == "" {
			return nil, "", &RefusedError{Reason: "a drill record needs an id"}
		}
		n := with(cur.Map)
		n.Drills = upsert(cur.Drills, *cmd.Drill, func(d Drill) string { return d.ID }, maxDrills)
		return n, "", nil
	case OpHandoff:
		if cmd.Handoff == nil || cmd.Handoff.ID == "" {
			return nil, "", &RefusedError{Reason: "handoff record without an id"}
		}
		n := with(cur.Map)
		n.Handoffs = upsert(cur.Handoffs, *cmd.Handoff, func(h Handoff) string { return h.ID }, maxHandoffs)
		return n, "", nil
	case OpGrant:
		if cur.Map == nil || cmd.TTL <= 0 {
			return nil, "", &RefusedError{Reason: "grant needs a topology and a positive ttl"}
		}
		leases := slices.Clone(cur.Leases)
		for _, u := range cmd.Grants {
			if _, ok := cur.Map.Unit(u); !ok {
				continue
			}
			i := slices.IndexFunc(leases, func(l Lease) bool { return l.Unit == u })
			if i < 0 {
				leases = append(leases, Lease{Unit: u})
				i = len(leases) - 1
			}
			leases[i].Seq++
			leases[i].TTL, leases[i].GrantedAt = cmd.TTL, cmd.At
		}
		slices.SortFunc(leases, func(a, b Lease) int { return strings.Compare(a.Unit, b.Unit) })
		n := with(cur.Map)
		n.Leases = leases
		return n, "", nil
	case OpReplica:
		r := cmd.Replica
		if r == nil || r.ID == "" || r.Raft == "" || r.API == "" {
			return nil, "", &RefusedError{Reason: "replica record needs an id and its raft and api addresses"}
		}
		i := slices.IndexFunc(cur.Replicas, func(o Replica) bool { return o.ID == r.ID })
		if i >= 0 && cur.Replicas[i] == *r {
			return nil, "", nil
		}
		n := with(cur.Map)
		n.Replicas = slices.DeleteFunc(slices.Clone(cur.Replicas), func(o Replica) bool { return o.ID == r.ID })
		n.Replicas = append(n.Replicas, *r)
		slices.SortFunc(n.Replicas, func(a, b Replica) int { return strings.Compare(a.ID, b.ID) })
		return n, fmt.Sprintf("replica %s serves api %s, xds %s, raft %s", r.ID, r.API, r.XDS, r.Raft), nil
	case OpForgetReplica:
		if cmd.Replica == nil {
			return nil, "", &RefusedError{Reason: "forget-replica without a replica"}
		}
		i := slices.IndexFunc(cur.Replicas, func(o Replica) bool { return o.ID == cmd.Replica.ID })
		if i < 0 {
			return nil, "", nil
		}
		n := with(cur.Map)
		n.Replicas = slices.Delete(slices.Clone(cur.Replicas), i, i+1)
		return n, fmt.Sprintf("replica %s removed", cmd.Replica.ID), nil
	}
	return nil, "", &RefusedError{Reason: fmt.Sprintf("unknown op %q", cmd.Op)}
}

// CheckRegistration refuses an endpoint the map cannot route to.
func CheckRegistration(m *routing.ShardMap, r Registration) error {
	if m == nil {
		return &RefusedError{Reason: "no topology yet: endpoints register once the topology is set"}
	}
	u, ok := m.Unit(r.Unit)
	switch {
	case !ok:
		return &RefusedError{Reason: fmt.Sprintf("unit %q is not in topology version %d", r.Unit, m.Version())}
	case r.Region != "" && r.Region != u.Region:
		return &RefusedError{Reason: fmt.Sprintf("unit %s is in region %s, not %s", r.Unit, u.Region, r.Region)}
	case r.Service == "":
		return &RefusedError{Reason: "endpoint without a service"}
	case r.Transport != "quic" && r.Transport != "h2":
		return &RefusedError{Reason: fmt.Sprintf("transport %q: want quic or h2", r.Transport)}
	}
	if _, err := netip.ParseAddrPort(r.Address); err != nil {
		return &RefusedError{Reason: fmt.Sprintf("endpoint address %q: want ip:port", r.Address)}
	}
	return nil
}

// nextMap computes the map a topology change or a move leads to, or why it
// is refused.
func nextMap(cur *routing.ShardMap, cmd Command) (*routing.ShardMap, string, error) {
	switch cmd.Op {
	case OpSetTopology:
		if cmd.Topology == nil {
			return nil, "", &RefusedError{Reason: "set-topology without a topology"}
		}
		m, err := routing.Compile(cmd.Topology)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		if cur != nil {
			if err := cur.CheckSuccessor(m); err != nil {
				return nil, "", &RefusedError{Reason: err.Error()}
			}
		}
		return m, fmt.Sprintf("set topology version %d", m.Version()), nil
	case OpMove:
		if cur == nil {
			return nil, "", &RefusedError{Reason: "no topology yet"}
		}
		owner, err := cur.Lookup(cmd.Shard)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		if owner.Epoch != cmd.Epoch {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is at epoch %d, not %d: read it again", routing.ShardName(cmd.Shard), owner.Epoch, cmd.Epoch)}
		}
		if _, ok := cur.Unit(cmd.To); !ok {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("unit %q is not in topology version %d", cmd.To, cur.Version())}
		}
		if owner.State != routing.StateServing {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is %s: a shard moves only while serving", routing.ShardName(cmd.Shard), owner.State)}
		}
		if owner.Unit == cmd.To {
			return nil, "", &RefusedError{Reason: fmt.Sprintf("%s is already on %s", routing.ShardName(cmd.Shard), cmd.To)}
		}
		t := cur.Topology()
		t.Version++
		for i := range t.Assignments {
			a := &t.Assignments[i]
			if a.Shard != cmd.Shard {
				continue
			}
			sb := []string{a.Primary}
			for _, u := range a.Standbys {
				if u != cmd.To && u != a.Primary {
					sb = append(sb, u)
				}
			}
			a.Primary, a.Standbys, a.Epoch = cmd.To, sb, a.Epoch+1
		}
		m, err := routing.Compile(t)
		if err != nil {
			return nil, "", &RefusedError{Reason: err.Error()}
		}
		return m, fmt.Sprintf("move %s from %s to %s, epoch %d", routing.ShardName(cmd.Shard), owner.Unit, cmd.To, owner.Epoch+1), nil
	}
	return nil, "", &RefusedError{Reason: fmt.Sprintf("unknown op %q", cmd.Op)}
}

// snapshotState is what a snapshot holds.
type snapshotState struct {
	Index     uint64            `json:"index"`
	Topology  *routing.Topology `json:"topology"`
	Endpoints []Registration    `json:"endpoints"`
	Replicas  []Replica         `json:"replicas"`
	Leases    []Lease           `json:"leases"`
	Handoffs  []Handoff         `json:"handoffs,omitempty"`
	Drills    []Drill           `json:"drills,omitempty"`
	Actions   []Action          `json:"actions"`
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	cur := f.cur.Load()
	st := snapshotState{Index: cur.Index, Endpoints: cur.Endpoints, Replicas: cur.Replicas, Leases: cur.Leases, Handoffs: cur.Handoffs, Drills: cur.Drills, Actions: f.actions()}
	if cur.Map != nil {
		st.Topology = cur.Map.Topology()
	}
	return &snapshot{st}, nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var st snapshotState
	if err := json.NewDecoder(rc).Decode(&st); err != nil {
		return fmt.Errorf("decode snapshot: %w", err)
	}
	n := &State{Index: st.Index, Endpoints: st.Endpoints, Replicas: st.Replicas, Leases: st.Leases, Handoffs: st.Handoffs, Drills: st.Drills}
	if st.Topology != nil {
		var err error
		if n.Map, err = routing.Compile(st.Topology); err != nil {
			return fmt.Errorf("snapshot topology: %w", err)
		}
	}
	f.cur.Store(n)
	f.mu.Lock()
	f.acts = st.Actions
	f.mu.Unlock()
	f.notify()
	return nil
}

type snapshot struct{ st snapshotState }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if err := json.NewEncoder(sink).Encode(s.st); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}
