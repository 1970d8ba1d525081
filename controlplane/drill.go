package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/routing"
)

// Drill kinds.
const (
	// DrillEvacuate moves every shard whose primary is in the region (or
	// unit) to a standby outside it, one planned handoff after another.
	DrillEvacuate = "evacuate"
	// DrillRestore moves back the shards the last evacuation of the same
	// region (or unit) moved and that are still where it put them.
	DrillRestore = "restore"
)

// DrillRequest is the body of POST /v1/drills.
type DrillRequest struct {
	Kind   string `json:"kind"`
	Region string `json:"region,omitempty"`
	Unit   string `json:"unit,omitempty"`
	DryRun bool   `json:"dry_run,omitempty"`
}

// DrillPlan answers a dry run: the moves the drill would make and the
// safety rules they pass or break (Refused).
type DrillPlan struct {
	Kind    string               `json:"kind"`
	Region  string               `json:"region,omitempty"`
	Unit    string               `json:"unit,omitempty"`
	DryRun  bool                 `json:"dry_run"`
	Moves   []DrillMove          `json:"moves"`
	Rules   []routing.RuleResult `json:"rules"`
	Refused bool                 `json:"refused"`
}

// DrillMove is one shard's move in a drill's plan.
type DrillMove struct {
	Shard int    `json:"shard"`
	From  string `json:"from"`
	To    string `json:"to"`
	Epoch uint64 `json:"epoch"`
}

// drills runs the leader's drill, one at a time.
type drills struct {
	mu      sync.Mutex
	running string       // the running drill's id
	abort   *atomic.Bool // set by an abort: the drill stops after its current move
	ctx     context.Context
	// beforeMove, when set (tests), runs before the drill's i-th move.
	beforeMove func(i int)
}

// setContext gives the drills the orchestrator's lifetime: a drill runs
// past the request that started it, until the replica stops.
func (d *drills) setContext(ctx context.Context) {
	d.mu.Lock()
	d.ctx = ctx
	d.mu.Unlock()
}

// planDrill computes the drill's moves on the current map: the moves and
// the rules they were checked against.
func (r *Replica) planDrill(m *routing.ShardMap, req DrillRequest) (*DrillPlan, error) {
	switch {
	case req.Kind != DrillEvacuate && req.Kind != DrillRestore:
		return nil, errorf(http.StatusBadRequest, "drill kind %q: want %s or %s (kill and partition drills are not in the control plane yet)", req.Kind, DrillEvacuate, DrillRestore)
	case (req.Region == "") == (req.Unit == ""):
		return nil, errorf(http.StatusBadRequest, `a drill names one target: "region" or "unit"`)
	}
	if req.Unit != "" {
		if _, ok := m.Unit(req.Unit); !ok {
			return nil, errorf(http.StatusBadRequest, "unit %q is not in topology version %d", req.Unit, m.Version())
		}
	} else if !slices.ContainsFunc(m.Topology().Regions, func(rg routing.Region) bool { return rg.Name == req.Region }) {
		return nil, errorf(http.StatusBadRequest, "region %q is not in topology version %d", req.Region, m.Version())
	}
	plan := &DrillPlan{Kind: req.Kind, Region: req.Region, Unit: req.Unit, DryRun: req.DryRun, Moves: []DrillMove{}}
	obs := routing.Observed{Lost: r.downUnits()}
	var rp *routing.Plan
	var err error
	switch {
	case req.Kind == DrillEvacuate && req.Region != "":
		rp, err = routing.EvacuateRegion(m, req.Region, obs)
	case req.Kind == DrillEvacuate:
		rp, err = routing.EvacuateUnit(m, req.Unit, obs)
	default:
		moves := r.restoreMoves(m, req)
		if len(moves) == 0 {
			return nil, errorf(http.StatusConflict, "nothing to restore: no finished evacuation of %s%s moved shards that are still where it put them", req.Region, req.Unit)
		}
		rp = movesPlan(m, "restore "+req.Region+req.Unit, moves)
		rp.Rules = routing.CheckPlan(m, rp, obs)
	}
	var refused *routing.RefusedError
	if err != nil && !errors.As(err, &refused) || rp == nil {
		return nil, errorf(http.StatusConflict, "no plan for the drill: %v", err)
	}
	for _, mv := range rp.Moves {
		if mv.PrimaryChange() {
			plan.Moves = append(plan.Moves, DrillMove{Shard: mv.Shard, From: mv.From, To: mv.To, Epoch: mv.FromEpoch})
		}
	}
	plan.Rules, plan.Refused = rp.Rules, rp.Refused()
	return plan, nil
}

// movesPlan is a plan of moves made one after another as planned
// handoffs make them: the new primary's standbys are the old primary and
// the other old standbys, and a target that held no copy is copied first.
func movesPlan(m *routing.ShardMap, target string, moves []DrillMove) *routing.Plan {
	p := &routing.Plan{Kind: "move", Target: target, Version: m.Version()}
	for i, dm := range moves {
		o, err := m.Lookup(dm.Shard)
		if err != nil {
			continue
		}
		sb := []string{o.Unit}
		for _, u := range o.Standbys {
			if u != dm.To && u != o.Unit {
				sb = append(sb, u)
			}
		}
		p.Moves = append(p.Moves, routing.Move{Shard: dm.Shard, Global: dm.Shard == routing.GlobalShard, From: o.Unit, To: dm.To, FromEpoch: o.Epoch, ToEpoch: o.Epoch + 1,
			Standbys: sb, OldStandbys: o.Standbys, Wave: i + 1, CopyFirst: !slices.Contains(o.Standbys, dm.To)})
	}
	p.Waves = len(p.Moves)
	return p
}

// restoreMoves are the moves of the last finished evacuation of the
// target whose shards are still on the unit it moved them to.
func (r *Replica) restoreMoves(m *routing.ShardMap, req DrillRequest) []DrillMove {
	st := r.store.State()
	var last *store.Drill
	for i := len(st.Drills) - 1; i >= 0; i-- {
		d := &st.Drills[i]
		if d.Kind == DrillEvacuate && d.Region == req.Region && d.Unit == req.Unit && d.Phase != "running" {
			last = d
			break
		}
	}
	if last == nil {
		return nil
	}
	var out []DrillMove
	for _, s := range last.Shards {
		if s.Phase != "done" {
			continue
		}
		if o, err := m.Lookup(s.Shard); err == nil && o.Unit == s.To {
			out = append(out, DrillMove{Shard: s.Shard, From: s.To, To: s.From, Epoch: o.Epoch})
		}
	}
	return out
}

// downUnits are the units gossip finds down.
func (r *Replica) downUnits() []string {
	var lost []string
	v := r.health.View()
	for _, u := range v.Units {
		if u.State == failover.StateDown {
			lost = append(lost, u.Unit)
		}
	}
	return lost
}

// postDrill starts a drill (or answers its plan for a dry run). A drill
// whose plan breaks a safety rule is refused (409) and changes nothing.
func (r *Replica) postDrill(req *http.Request) (any, error) {
	m, err := r.currentMap()
	if err != nil {
		return nil, err
	}
	var body DrillRequest
	if err := decodeBody(req, &body); err != nil {
		return nil, err
	}
	plan, err := r.planDrill(m, body)
	if err != nil {
		return nil, err
	}
	if body.DryRun {
		return plan, nil
	}
	if plan.Refused {
		var broken []routing.RuleResult
		for _, rr := range plan.Rules {
			if !rr.OK {
				broken = append(broken, rr)
			}
		}
		return nil, errorf(http.StatusConflict, "drill refused, nothing changed: %v", &routing.RefusedError{Kind: routing.PlanKind(body.Kind), Target: body.Region + body.Unit, Broken: broken})
	}
	if len(plan.Moves) == 0 {
		return nil, errorf(http.StatusConflict, "nothing to %s: no shard has its primary in %s%s", body.Kind, body.Region, body.Unit)
	}
	who := "api"
	if by := req.Header.Get(forwardedHeader); by != "" {
		who = "api via " + by
	}
	d := &r.drills
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.running != "" {
		return nil, errorf(http.StatusConflict, "drill %s is running: wait for it or abort it", d.running)
	}
	if d.ctx == nil {
		return nil, errorf(http.StatusServiceUnavailable, "the orchestrator is not running on this replica yet: retry")
	}
	rec := store.Drill{ID: newHandoffID(), Kind: body.Kind, Region: body.Region, Unit: body.Unit, Who: who, Phase: "running",
		Started: time.Now().UTC(), Total: len(plan.Moves), Rules: plan.Rules}
	for _, mv := range plan.Moves {
		rec.Shards = append(rec.Shards, store.DrillShard{Shard: mv.Shard, From: mv.From, To: mv.To, Phase: "waiting"})
	}
	rec.Events = append(rec.Events, store.DrillEvent{At: rec.Started, Msg: fmt.Sprintf("%s %s%s started by %s: %d shards to move, %d safety rules passed", body.Kind, body.Region, body.Unit, who, len(plan.Moves), len(plan.Rules))})
	if _, err := r.leaderWrite(req.Context(), store.Command{Op: store.OpDrill, Drill: &rec, Who: who, At: rec.Started}); err != nil {
		return nil, err
	}
	d.running, d.abort = rec.ID, new(atomic.Bool)
	go r.runDrill(d.ctx, cloneDrill(rec), d.abort)
	r.log.Info("drill started", "drill", rec.ID, "kind", rec.Kind, "region", rec.Region, "unit", rec.Unit, "shards", rec.Total, "by", who)
	return rec, nil
}

// runDrill moves the drill's shards one planned handoff after another,
// recording each in the drill's report, until done or aborted.
func (r *Replica) runDrill(ctx context.Context, rec store.Drill, abort *atomic.Bool) {
	defer func() {
		r.drills.mu.Lock()
		r.drills.running, r.drills.abort = "", nil
		r.drills.mu.Unlock()
	}()
	save := func() {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		c := cloneDrill(rec)
		if _, err := r.store.Apply(sctx, store.Command{Op: store.OpDrill, Drill: &c, Who: "drill " + rec.ID, At: time.Now().UTC()}); err != nil {
			r.log.Warn("drill report not committed", "drill", rec.ID, "error", err)
		}
	}
	event := func(format string, args ...any) {
		rec.Events = append(rec.Events, store.DrillEvent{At: time.Now().UTC(), Msg: fmt.Sprintf(format, args...)})
	}
	failed := 0
	for i := range rec.Shards {
		s := &rec.Shards[i]
		if r.drills.beforeMove != nil {
			r.drills.beforeMove(i)
		}
		if abort.Load() || ctx.Err() != nil {
			s.Phase = "skipped"
			continue
		}
		m := r.store.Map()
		o, err := m.Lookup(s.Shard)
		switch {
		case err != nil:
			s.Phase, s.Error = "failed", err.Error()
		case o.Unit != s.From:
			s.Phase, s.Error = "skipped", fmt.Sprintf("now on %s, not %s", o.Unit, s.From)
		}
		if s.Phase != "waiting" {
			event("shard %d %s: %s", s.Shard, s.Phase, s.Error)
			save()
			continue
		}
		s.Started = time.Now().UTC()
		h, err := r.orch.planned(ctx, s.Shard, s.To, o.Epoch, false, "drill "+rec.ID)
		s.Ended = time.Now().UTC()
		if err != nil {
			failed++
			s.Phase, s.Error = "failed", err.Error()
			event("shard %d not moved from %s to %s (%d of %d): %v", s.Shard, s.From, s.To, i+1, rec.Total, err)
		} else {
			rec.Moved++
			s.Phase, s.Epoch, s.WritePauseSeconds, s.Gap = "done", h.Epoch, h.WritePauseSeconds, h.Gap
			s.RPOOK = h.Gap == 0
			rec.WritePauseMaxSeconds = max(rec.WritePauseMaxSeconds, h.WritePauseSeconds)
			event("shard %d moved %s -> %s at epoch %d (%d of %d): write pause %.0f ms, RPO check passed", s.Shard, s.From, s.To, h.Epoch, i+1, rec.Total, 1000*h.WritePauseSeconds)
		}
		save()
	}
	rec.Ended = time.Now().UTC()
	switch {
	case abort.Load():
		rec.Phase, rec.Reason = "aborted", fmt.Sprintf("aborted by an operator after %d of %d shards; those moved stay moved", rec.Moved, rec.Total)
	case ctx.Err() != nil:
		rec.Phase, rec.Reason = "failed", "the replica stopped mid-drill"
	case failed > 0:
		rec.Phase, rec.Reason = "failed", fmt.Sprintf("%d of %d shards not moved (see their errors)", failed, rec.Total)
	default:
		rec.Phase = "done"
	}
	event("drill %s: %d of %d shards moved in %s, longest write pause %.0f ms", rec.Phase, rec.Moved, rec.Total, rec.Ended.Sub(rec.Started).Round(time.Millisecond), 1000*rec.WritePauseMaxSeconds)
	r.m.drills.WithLabelValues(rec.Kind, rec.Phase).Inc()
	r.log.Info("drill ended", "drill", rec.ID, "phase", rec.Phase, "moved", rec.Moved, "total", rec.Total, "reason", rec.Reason)
	save()
}

// cloneDrill copies a drill record, its slices too.
func cloneDrill(d store.Drill) store.Drill {
	d.Shards, d.Events, d.Rules = slices.Clone(d.Shards), slices.Clone(d.Events), slices.Clone(d.Rules)
	return d
}

// getDrills lists the drills, newest last.
func (r *Replica) getDrills(*http.Request) (any, error) {
	st := r.store.State()
	out := struct {
		Drills []store.Drill `json:"drills"`
	}{Drills: st.Drills}
	if out.Drills == nil {
		out.Drills = []store.Drill{}
	}
	return out, nil
}

// getDrill is one drill's report.
func (r *Replica) getDrill(req *http.Request) (any, error) {
	id := req.PathValue("id")
	for _, d := range r.store.State().Drills {
		if d.ID == id {
			return d, nil
		}
	}
	return nil, errorf(http.StatusNotFound, "no drill %q (GET /v1/drills lists them)", id)
}

// postDrillAbort stops a running drill after its current move: every
// shard keeps exactly one serving primary.
func (r *Replica) postDrillAbort(req *http.Request) (any, error) {
	id := req.PathValue("id")
	d := &r.drills
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.running != id {
		for _, rec := range r.store.State().Drills {
			if rec.ID == id {
				return nil, errorf(http.StatusConflict, "drill %s is not running here (phase %s)", id, rec.Phase)
			}
		}
		return nil, errorf(http.StatusNotFound, "no drill %q", id)
	}
	d.abort.Store(true)
	return map[string]string{"drill": id, "status": "aborting: it stops after the move in progress"}, nil
}

// reconcileDrills marks failed the drills an earlier leader left running
// (called on leadership).
func (r *Replica) reconcileDrills(ctx context.Context) {
	r.drills.mu.Lock()
	running := r.drills.running
	r.drills.mu.Unlock()
	for _, d := range r.store.State().Drills {
		if d.Phase != "running" || d.ID == running {
			continue
		}
		d.Phase, d.Reason, d.Ended = "failed", "the leader that ran it lost the lead; the shards it moved stay moved", time.Now().UTC()
		d.Events = append(slices.Clone(d.Events), store.DrillEvent{At: d.Ended, Msg: d.Reason})
		if _, err := r.store.Apply(ctx, store.Command{Op: store.OpDrill, Drill: &d, Who: "leader " + r.cfg.ID, At: d.Ended}); err != nil {
			r.log.Warn("a drill left running by an earlier leader not marked failed", "drill", d.ID, "error", err)
		}
	}
}
