package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/routing"
)

// The failover orchestrator runs on the raft leader. It keeps the last
// replication report of every unit of every handoff service (the handoff
// contract), fails over the shards of units gossip finds down once their
// lease has ended and their standby's last report proves no acknowledged
// write is lost, and runs planned handoffs (POST /v1/shards/{id}/move):
// draining, the check, the commit at epoch+1, the push, demote and
// promote. A shard has one handoff at a time.
type orchestrator struct {
	r        *Replica
	contract *contract

	mu      sync.Mutex
	busy    map[int]bool          // shards with a handoff running
	reports map[string]unitReport // by unit + "/" + service
	down    map[string]time.Time  // units found down, since when
	blocked map[int]string        // shards blocked by this leader, and why (logged once)
	lastLog string                // logOnce's last message
}

type unitReport struct {
	rep failover.Replication
	at  time.Time
}

// leaseSkewMargin is what sidecars take off a lease (proxy's margin): the
// leader waits the lease's end plus this before it promotes a standby.
const leaseSkewMargin = 500 * time.Millisecond

// pollEvery is how often the leader reads every handoff service's
// watermarks; failoverEvery how often it looks for lost units.
const (
	pollEvery     = 250 * time.Millisecond
	failoverEvery = 100 * time.Millisecond
)

func newOrchestrator(r *Replica) *orchestrator {
	return &orchestrator{r: r, contract: newContract(r.cfg.TLS), busy: map[int]bool{}, reports: map[string]unitReport{},
		down: map[string]time.Time{}, blocked: map[int]string{}}
}

// run polls the watermarks and looks for lost units, on two goroutines
// (a slow poll must not delay a failover), until ctx ends.
func (o *orchestrator) run(ctx context.Context) {
	o.r.drills.setContext(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		poll := time.NewTicker(pollEvery)
		defer poll.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-poll.C:
				if o.r.store.IsLeader() && len(o.r.cfg.HandoffServices) > 0 {
					o.poll(ctx)
				}
			}
		}
	}()
	defer wg.Wait()
	fail := time.NewTicker(failoverEvery)
	defer fail.Stop()
	leader := false
	var reconciled time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-fail.C:
		}
		if !o.r.store.IsLeader() {
			if leader {
				// Another leader decides now, from its own reports.
				o.mu.Lock()
				clear(o.down)
				clear(o.blocked)
				clear(o.reports)
				o.mu.Unlock()
			}
			leader = false
			continue
		}
		if !leader || time.Since(reconciled) > 5*time.Second {
			o.reconcile(ctx)
			o.r.reconcileDrills(ctx)
			reconciled = time.Now()
		}
		leader = true
		o.failover(ctx)
	}
}

// reconcile puts back to serving every draining shard with no handoff
// running here: one a lost leader left half done (its move was never
// committed, so its old owner still owns it).
func (o *orchestrator) reconcile(ctx context.Context) {
	m := o.r.store.Map()
	if m == nil {
		return
	}
	for _, a := range m.Topology().Assignments {
		if a.State != routing.StateDraining {
			continue
		}
		o.mu.Lock()
		busy := o.busy[a.Shard]
		o.mu.Unlock()
		if busy {
			continue
		}
		if _, err := o.r.store.Apply(ctx, store.Command{Op: store.OpState, Shard: a.Shard, Epoch: a.Epoch, State: routing.StateServing, Who: "orchestrator " + o.r.cfg.ID + " (a handoff left unfinished by an earlier leader)", At: time.Now().UTC()}); err != nil {
			o.r.log.Warn("a draining shard with no handoff running not put back to serving", "shard", a.Shard, "error", err)
		} else {
			o.r.log.Warn("a shard left draining by an earlier leader serves again from its primary", "shard", a.Shard, "unit", a.Primary)
		}
	}
}

// endpoints are the registered, live endpoints of unit for service.
func endpointsOf(st *store.State, unit, service string) []store.Registration {
	var out []store.Registration
	for _, e := range st.Endpoints {
		if e.Unit == unit && e.Service == service && !e.Down {
			out = append(out, e)
		}
	}
	return out
}

// poll reads every live endpoint's watermarks, one unit's service at a time
// from its first endpoint that answers.
func (o *orchestrator) poll(ctx context.Context) {
	st := o.r.store.State()
	type key struct{ unit, service string }
	eps := map[key][]store.Registration{}
	keep := map[string]bool{}
	for _, e := range st.Endpoints {
		if !e.Down && slices.Contains(o.r.cfg.HandoffServices, e.Service) {
			eps[key{e.Unit, e.Service}] = append(eps[key{e.Unit, e.Service}], e)
			keep[e.Key()] = true
		}
	}
	o.contract.forget(keep)
	var wg sync.WaitGroup
	for k, list := range eps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, ep := range list {
				pctx, cancel := context.WithTimeout(ctx, time.Second)
				rep, err := o.contract.report(pctx, ep)
				cancel()
				if err == nil {
					o.mu.Lock()
					o.reports[k.unit+"/"+k.service] = unitReport{rep: rep, at: time.Now()}
					o.mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
}

// lastReport is the last report of unit's service for shard.
func (o *orchestrator) lastReport(unit, service string, shard int) (failover.Report, time.Time, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	ur, ok := o.reports[unit+"/"+service]
	if !ok {
		return failover.Report{}, time.Time{}, false
	}
	r, found := ur.rep.Shard(shard)
	if !found {
		return failover.Report{}, ur.at, true // the unit answered and holds nothing of the shard
	}
	return r, ur.at, true
}

// freshReplication asks unit's service for its watermarks now.
func (o *orchestrator) freshReplication(ctx context.Context, unit, service string) (failover.Replication, error) {
	st := o.r.store.State()
	var last error = fmt.Errorf("no live endpoint of %s in unit %s", service, unit)
	for _, ep := range endpointsOf(st, unit, service) {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		rep, err := o.contract.report(pctx, ep)
		cancel()
		if err == nil {
			return rep, nil
		}
		last = err
	}
	return failover.Replication{}, last
}

// freshReport asks unit's service for one shard's report now.
func (o *orchestrator) freshReport(ctx context.Context, unit, service string, shard int) (failover.Report, error) {
	rep, err := o.freshReplication(ctx, unit, service)
	if err != nil {
		return failover.Report{}, err
	}
	r, _ := rep.Shard(shard)
	return r, nil
}

// setRole calls promote or demote on every live endpoint of unit's
// handoff services, retrying for a few seconds; it returns the last error.
func (o *orchestrator) setRole(ctx context.Context, unit, action string, shard int, epoch uint64) error {
	var errs []error
	for _, svc := range o.r.cfg.HandoffServices {
		deadline := time.Now().Add(3 * time.Second)
		for {
			var err error
			eps := endpointsOf(o.r.store.State(), unit, svc)
			if len(eps) == 0 {
				err = fmt.Errorf("no live endpoint of %s in unit %s", svc, unit)
			}
			for _, ep := range eps {
				cctx, cancel := context.WithTimeout(ctx, time.Second)
				err = o.contract.role(cctx, ep, action, shard, epoch)
				cancel()
				if err == nil {
					break
				}
			}
			if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
				if err != nil {
					errs = append(errs, fmt.Errorf("%s %s on %s: %w", action, svc, unit, err))
				}
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	return errors.Join(errs...)
}

func newHandoffID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (o *orchestrator) record(ctx context.Context, h store.Handoff) {
	hc := h
	if _, err := o.r.store.Apply(ctx, store.Command{Op: store.OpHandoff, Handoff: &hc, Who: "orchestrator " + o.r.cfg.ID, At: time.Now().UTC()}); err != nil {
		o.r.log.Warn("handoff record not committed", "handoff", h.ID, "shard", h.Shard, "phase", h.Phase, "error", err)
	}
}

func (o *orchestrator) claim(shard int) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.busy[shard] {
		return false
	}
	o.busy[shard] = true
	return true
}

func (o *orchestrator) release(shard int) {
	o.mu.Lock()
	delete(o.busy, shard)
	o.mu.Unlock()
}

// failover moves the shards of the units gossip finds down: a new primary
// for those they led, once the lease has ended and the standby's last
// report passes the check; new standbys for those they backed.
func (o *orchestrator) failover(ctx context.Context) {
	st := o.r.store.State()
	if st.Map == nil {
		return
	}
	v := o.r.health.View()
	now := time.Now()
	var lost []string
	o.mu.Lock()
	for _, u := range v.Units {
		if u.State == failover.StateDown {
			if _, ok := o.down[u.Unit]; !ok {
				o.down[u.Unit] = u.Since
			}
			lost = append(lost, u.Unit)
		} else {
			delete(o.down, u.Unit)
		}
	}
	o.mu.Unlock()
	if len(lost) == 0 {
		return
	}
	plan, err := routing.FailUnits(st.Map, lost, routing.Observed{Lost: lost})
	switch {
	case err != nil:
		o.logOnce(slog.LevelWarn, "no failover plan for the lost units", "units", lost, "error", err)
		return
	case plan.Refused():
		o.logOnce(slog.LevelError, "the failover plan breaks a safety rule; nothing moved: an operator must decide", "units", lost,
			"error", (&routing.RefusedError{Kind: plan.Kind, Target: plan.Target, Broken: brokenRules(plan)}).Error())
		return
	}
	reports := map[string]failover.Replication{} // read once per unit and service this round
	for _, mv := range plan.Moves {
		if !o.claim(mv.Shard) {
			continue
		}
		done := o.failShard(ctx, st, mv, now, reports)
		if done {
			o.release(mv.Shard)
		}
	}
}

// logOnce logs msg unless it was the last thing logged this way: the
// failover loop runs ten times a second.
func (o *orchestrator) logOnce(level slog.Level, msg string, args ...any) {
	key := fmt.Sprint(msg, args)
	o.mu.Lock()
	same := o.lastLog == key
	o.lastLog = key
	o.mu.Unlock()
	if !same {
		o.r.log.Log(context.Background(), level, msg, args...)
	}
}

func brokenRules(p *routing.Plan) []routing.RuleResult {
	var out []routing.RuleResult
	for _, r := range p.Rules {
		if !r.OK {
			out = append(out, r)
		}
	}
	return out
}

// failShard runs one move of a failover plan; it reports whether the
// shard is free again (false: a goroutine promotes it and frees it).
func (o *orchestrator) failShard(ctx context.Context, st *store.State, mv routing.Move, now time.Time, reports map[string]failover.Replication) bool {
	owner, err := st.Map.Lookup(mv.Shard)
	if err != nil || owner.Epoch != mv.FromEpoch || owner.State == routing.StateDraining {
		return true
	}
	if !mv.PrimaryChange() {
		// The lost unit backed the shard: new standbys, same primary and
		// epoch (its writes replicate to a live unit again).
		if _, err := o.r.store.Apply(ctx, store.Command{Op: store.OpPlanMove, Move: &mv, Who: "orchestrator " + o.r.cfg.ID + " (standby lost)", At: now.UTC()}); err != nil {
			o.r.log.Warn("standbys of a shard whose standby was lost not changed", "shard", mv.Shard, "error", err)
		} else {
			o.r.m.moves.WithLabelValues("standby-lost").Inc()
		}
		return true
	}
	// I3: the old primary's lease must have ended, on this leader's
	// clock, plus the sidecars' skew margin.
	for _, l := range st.Leases {
		if l.Unit == mv.From && now.Before(l.Ends().Add(leaseSkewMargin)) {
			return true
		}
	}
	o.mu.Lock()
	detected := o.down[mv.From]
	o.mu.Unlock()
	// I2: the standby the primary replicated to (its first) proves, in a
	// report read now, that it holds every acknowledged write, for every
	// handoff service.
	var gap uint64
	var why []string
	if len(o.r.cfg.HandoffServices) > 0 && (len(owner.Standbys) == 0 || owner.Standbys[0] != mv.To) {
		why = append(why, fmt.Sprintf("the plan's target %s is not the shard's first standby %v, which the primary replicated to", mv.To, owner.Standbys))
	}
	for _, svc := range o.r.cfg.HandoffServices {
		if len(why) > 0 {
			break
		}
		rep, ok := reports[mv.To+"/"+svc]
		if !ok {
			var err error
			if rep, err = o.freshReplication(ctx, mv.To, svc); err != nil {
				// No answer is no proof either way (the standby's sidecar
				// re-registering after a leader change, a slow answer):
				// the shard waits on its lost primary and the next round
				// asks again, rather than blocking it for an operator.
				o.logOnce(slog.LevelWarn, "failover waits: the standby did not report its watermarks", "shard", mv.Shard, "to", mv.To, "service", svc, "error", err)
				return true
			}
			reports[mv.To+"/"+svc] = rep
		}
		sr, _ := rep.Shard(mv.Shard)
		var lp *failover.Report
		if pr, _, ok := o.lastReport(mv.From, svc, mv.Shard); ok {
			lp = &pr
		}
		if err := failover.CheckUnplanned(mv.FromEpoch, sr, lp); err != nil {
			var be *failover.BlockedError
			errors.As(err, &be)
			why = append(why, svc+": "+be.Reason)
			gap = max(gap, be.Gap)
		}
	}
	if len(why) > 0 {
		o.block(ctx, owner, mv, "unplanned", fmt.Sprint(why), gap, detected)
		return true
	}
	h := store.Handoff{ID: newHandoffID(), Shard: mv.Shard, Kind: "unplanned", From: mv.From, To: mv.To, FromEpoch: mv.FromEpoch,
		Phase: "committing", Started: now.UTC(), Detected: detected.UTC()}
	if _, err := o.r.store.Apply(ctx, store.Command{Op: store.OpPlanMove, Move: &mv, LeaseMargin: leaseSkewMargin, Who: "orchestrator " + o.r.cfg.ID + " (unit " + mv.From + " lost)", At: time.Now().UTC()}); err != nil {
		o.r.log.Warn("failover of a shard not committed; retrying", "shard", mv.Shard, "to", mv.To, "error", err)
		return true
	}
	idx := o.r.store.State().Index
	h.Index = idx
	o.r.m.moves.WithLabelValues("unplanned").Inc()
	o.mu.Lock()
	delete(o.blocked, mv.Shard)
	o.mu.Unlock()
	go func() {
		defer o.release(mv.Shard)
		o.r.waitPublished(ctx, idx)
		h.Epoch = mv.FromEpoch + 1
		if err := o.setRole(ctx, mv.To, "promote", mv.Shard, h.Epoch); err != nil {
			h.Reason = err.Error()
		}
		h.Phase, h.Ended = "done", time.Now().UTC()
		o.record(ctx, h)
		o.r.m.handoffs.WithLabelValues("unplanned", "done").Inc()
		o.r.m.handoffSeconds.WithLabelValues("unplanned").Observe(h.Ended.Sub(detected).Seconds())
		o.r.log.Info("failed over a shard of a lost unit", "shard", mv.Shard, "from", mv.From, "to", mv.To, "epoch", h.Epoch,
			"since_down_seconds", h.Ended.Sub(detected).Seconds(), "promote_error", h.Reason)
	}()
	return false
}

// block marks a shard blocked (once per reason) and records why.
func (o *orchestrator) block(ctx context.Context, owner routing.Owner, mv routing.Move, kind, reason string, gap uint64, detected time.Time) {
	o.mu.Lock()
	same := o.blocked[mv.Shard] == reason
	o.blocked[mv.Shard] = reason
	o.mu.Unlock()
	if same && owner.State == routing.StateBlocked {
		return
	}
	if owner.State != routing.StateBlocked {
		if _, err := o.r.store.Apply(ctx, store.Command{Op: store.OpState, Shard: mv.Shard, Epoch: owner.Epoch, State: routing.StateBlocked, Who: "orchestrator " + o.r.cfg.ID, At: time.Now().UTC()}); err != nil {
			o.r.log.Warn("blocked state not committed", "shard", mv.Shard, "error", err)
		}
	}
	now := time.Now().UTC()
	o.record(ctx, store.Handoff{ID: newHandoffID(), Shard: mv.Shard, Kind: kind, From: mv.From, To: mv.To, FromEpoch: mv.FromEpoch,
		Phase: "blocked", Reason: reason, Gap: gap, Started: now, Ended: now, Detected: detected.UTC()})
	o.r.m.handoffs.WithLabelValues(kind, "blocked").Inc()
	o.r.log.Error("handoff blocked: the standby cannot be proven to hold every acknowledged write; the shard stays on its primary (cellmesh move --accept-data-loss overrides, recording the gap)",
		"shard", mv.Shard, "from", mv.From, "to", mv.To, "reason", reason, "gap", gap)
}

// planned runs a planned handoff of shard to unit to: the operator's move.
func (o *orchestrator) planned(ctx context.Context, shard int, to string, epoch uint64, acceptLoss bool, who string) (*store.Handoff, error) {
	if !o.claim(shard) {
		return nil, errorf(http.StatusConflict, "%s has a handoff in progress: wait for it to end", routing.ShardName(shard))
	}
	defer o.release(shard)
	m := o.r.store.Map()
	owner, err := m.Lookup(shard)
	if err != nil {
		return nil, errorf(http.StatusNotFound, "%v", err)
	}
	switch {
	case owner.Epoch != epoch:
		return nil, errorf(http.StatusConflict, "%s is at epoch %d, not %d: read it again", routing.ShardName(shard), owner.Epoch, epoch)
	case owner.Unit == to:
		return nil, errorf(http.StatusConflict, "%s is already on %s", routing.ShardName(shard), to)
	case owner.State == routing.StateDraining:
		return nil, errorf(http.StatusConflict, "%s is draining: a handoff is in progress", routing.ShardName(shard))
	}
	sb := []string{owner.Unit}
	for _, u := range owner.Standbys {
		if u != to && u != owner.Unit {
			sb = append(sb, u)
		}
	}
	mv := routing.Move{Shard: shard, Global: shard == routing.GlobalShard, From: owner.Unit, To: to, FromEpoch: epoch, ToEpoch: epoch + 1, Standbys: sb, OldStandbys: owner.Standbys, Wave: 1,
		CopyFirst: !slices.Contains(owner.Standbys, to)}
	plan := &routing.Plan{Kind: "move", Target: routing.ShardName(shard), Version: m.Version(), Moves: []routing.Move{mv}, Waves: 1}
	lost := o.r.downUnits()
	if slices.Contains(lost, to) {
		return nil, errorf(http.StatusConflict, "unit %s is down (gossip): a shard does not move there", to)
	}
	broken := brokenOf(routing.CheckPlan(m, plan, routing.Observed{Lost: lost}))
	if owner.State == routing.StateBlocked {
		// A blocked shard waits for an operator: this move is one.
		broken = slices.DeleteFunc(broken, func(r routing.RuleResult) bool { return r.Rule == routing.RuleOneHandoff })
	}
	if len(broken) > 0 {
		return nil, errorf(http.StatusConflict, "%v", &routing.RefusedError{Kind: plan.Kind, Target: plan.Target, Broken: broken})
	}
	start := time.Now()
	h := store.Handoff{ID: newHandoffID(), Shard: shard, Kind: "planned", From: owner.Unit, To: to, FromEpoch: epoch, Started: start.UTC(), AcceptDataLoss: acceptLoss}
	if len(o.r.cfg.HandoffServices) > 0 && (len(owner.Standbys) == 0 || owner.Standbys[0] != to) {
		// Copy first: the target becomes the first standby, which the
		// primary replicates to, and the handoff waits for it to catch up
		// before it drains.
		rest := []string{to}
		for _, u := range owner.Standbys {
			if u != to {
				rest = append(rest, u)
			}
		}
		first := routing.Move{Shard: shard, From: owner.Unit, To: owner.Unit, FromEpoch: epoch, ToEpoch: epoch, Standbys: rest, OldStandbys: owner.Standbys, Wave: 1}
		if _, err := o.r.leaderWrite(ctx, store.Command{Op: store.OpPlanMove, Move: &first, Who: who + " (copy first)", At: time.Now().UTC()}); err != nil {
			return nil, err
		}
		o.r.waitPublished(ctx, o.r.store.State().Index)
		if _, err := o.check(ctx, shard, owner.Unit, to, epoch, false); err != nil {
			o.r.log.Warn("the new standby has not caught up before the drain; the handoff goes on and checks again", "shard", shard, "to", to, "error", err)
		}
		mv.OldStandbys = rest
	}
	if len(o.r.cfg.HandoffServices) > 0 {
		// Drain: the old owner's sidecars hold new writes.
		if _, err := o.r.leaderWrite(ctx, store.Command{Op: store.OpState, Shard: shard, Epoch: epoch, State: routing.StateDraining, Who: who, At: start.UTC()}); err != nil {
			return nil, err
		}
		o.r.waitPublished(ctx, o.r.store.State().Index)
		h.Phase = "checking"
		gap, err := o.check(ctx, shard, owner.Unit, to, epoch, true)
		if err != nil {
			var be *failover.BlockedError
			if !errors.As(err, &be) || !acceptLoss {
				o.block(ctx, routing.Owner{Shard: shard, Epoch: epoch, State: routing.StateDraining}, mv, "planned", err.Error(), gap, time.Time{})
				return nil, errorf(http.StatusConflict, "%v: %s is blocked on %s; move it again once the standby has caught up, or with --accept-data-loss (the gap is recorded)", err, routing.ShardName(shard), owner.Unit)
			}
			h.Gap, h.Reason = gap, "accepted data loss: "+err.Error()
			o.r.log.Warn("planned handoff forced with --accept-data-loss", "shard", shard, "from", owner.Unit, "to", to, "gap", gap, "reason", err)
		}
	}
	if _, err := o.r.leaderWrite(ctx, store.Command{Op: store.OpPlanMove, Move: &mv, Who: who, At: time.Now().UTC()}); err != nil {
		if len(o.r.cfg.HandoffServices) > 0 {
			// Serve again from the old owner: the move did not happen.
			_, _ = o.r.store.Apply(ctx, store.Command{Op: store.OpState, Shard: shard, Epoch: epoch, State: routing.StateServing, Who: who + " (handoff not committed)", At: time.Now().UTC()})
		}
		return nil, err
	}
	idx := o.r.store.State().Index
	o.r.waitPublished(ctx, idx)
	h.Epoch, h.Phase, h.Index = epoch+1, "done", idx
	h.WritePauseSeconds = time.Since(start).Seconds()
	if len(o.r.cfg.HandoffServices) > 0 {
		var errs []error
		if err := o.setRole(ctx, owner.Unit, "demote", shard, h.Epoch); err != nil {
			errs = append(errs, err)
		}
		if err := o.setRole(ctx, to, "promote", shard, h.Epoch); err != nil {
			errs = append(errs, err)
		}
		if len(errs) > 0 {
			h.Reason = errors.Join(errs...).Error()
		}
	}
	h.Ended = time.Now().UTC()
	o.record(ctx, h)
	reason := "planned"
	if acceptLoss && h.Gap > 0 {
		reason = "forced"
	}
	o.r.m.moves.WithLabelValues(reason).Inc()
	o.r.m.handoffs.WithLabelValues("planned", "done").Inc()
	o.r.m.handoffSeconds.WithLabelValues("planned").Observe(h.Ended.Sub(start).Seconds())
	o.r.m.writePause.Observe(h.WritePauseSeconds)
	o.mu.Lock()
	delete(o.blocked, shard)
	o.mu.Unlock()
	return &h, nil
}

func brokenOf(rules []routing.RuleResult) []routing.RuleResult {
	var out []routing.RuleResult
	for _, r := range rules {
		if !r.OK {
			out = append(out, r)
		}
	}
	return out
}

// check waits (up to HandoffTimeout) until every handoff service passes
// the planned check: nothing in flight at the primary (when drained), the
// standby caught up, twice in a row.
func (o *orchestrator) check(ctx context.Context, shard int, from, to string, epoch uint64, drained bool) (uint64, error) {
	deadline := time.Now().Add(o.r.cfg.HandoffTimeout)
	passes := 0
	var last error
	var gap uint64
	for {
		last, gap = nil, 0
		for _, svc := range o.r.cfg.HandoffServices {
			p, err := o.freshReport(ctx, from, svc, shard)
			if err != nil {
				last = &failover.BlockedError{Reason: fmt.Sprintf("%s in %s did not report: %v", svc, from, err)}
				break
			}
			s, err := o.freshReport(ctx, to, svc, shard)
			if err != nil {
				last = &failover.BlockedError{Reason: fmt.Sprintf("%s in %s did not report: %v", svc, to, err)}
				break
			}
			if !drained {
				p.Received = p.Committed // writes flow: only the standby's catching up counts
			}
			if err := failover.CheckPlanned(epoch, p, s); err != nil {
				var be *failover.BlockedError
				errors.As(err, &be)
				last, gap = &failover.BlockedError{Reason: svc + ": " + be.Reason, Gap: be.Gap}, be.Gap
				break
			}
		}
		if last == nil {
			passes++
			if passes >= 2 {
				return 0, nil
			}
		} else {
			passes = 0
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			if last == nil {
				return 0, nil
			}
			return gap, last
		}
		time.Sleep(50 * time.Millisecond)
	}
}
