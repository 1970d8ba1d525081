package controlplane

import (
	"context"
	"slices"
	"time"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/routing"
)

// healthTick is how often the replica evaluates gossip health (grace,
// hold-down) and, as the leader, commits which endpoints are down.
const healthTick = 100 * time.Millisecond

// startGossip joins the replica to the gossip pool when Config.Gossip
// says so: the replica's health view then follows every sidecar.
func (r *Replica) startGossip() error {
	if r.cfg.Gossip == nil {
		return nil
	}
	gc := *r.cfg.Gossip
	gc.Meta = failover.Meta{Role: failover.RoleControlPlane, Region: r.cfg.Region, Address: r.apiLn.Addr().String()}
	if gc.Meta.Region == "" {
		gc.Meta.Region = "none"
	}
	gc.Name = failover.RoleControlPlane + "/" + r.cfg.ID
	gc.Observer = r.health
	gc.Logger = r.cfg.Logger
	ms, err := failover.Start(gc)
	if err != nil {
		return err
	}
	r.gossip = ms
	return nil
}

// Gossip is the replica's member of the gossip pool, nil without one.
func (r *Replica) Gossip() *failover.Membership { return r.gossip }

// healthLoop keeps the health view current: the topology's units, the
// timers, the event log in the replica's log; as the leader it commits
// which registered endpoints gossip finds down.
func (r *Replica) healthLoop(ctx context.Context) {
	t := time.NewTicker(healthTick)
	defer t.Stop()
	var lastMap *routing.ShardMap
	var logged uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-r.health.Changed():
		}
		now := time.Now()
		st := r.store.State()
		if st.Map != nil && st.Map != lastMap {
			lastMap = st.Map
			units := map[string]string{}
			for _, u := range st.Map.Topology().Units {
				units[u.Name] = u.Region
			}
			r.health.SetUnits(now, units)
		}
		r.health.Tick(now)
		for _, e := range r.health.Events(logged) {
			logged = e.Seq
			r.logEvent(e)
		}
		if r.store.IsLeader() {
			r.commitEndpointHealth(ctx, st)
		}
	}
}

func (r *Replica) logEvent(e failover.Event) {
	args := []any{"kind", e.Kind, "name", e.Name, "from", e.From, "to", e.To}
	if e.Region != "" {
		args = append(args, "region", e.Region)
	}
	if e.Unit != "" && e.Kind != "unit" {
		args = append(args, "unit", e.Unit)
	}
	if e.Reason != "" {
		args = append(args, "reason", e.Reason)
	}
	switch {
	case e.Kind != "member" && (e.To == string(failover.StateDown) || e.To == string(failover.StateSuspect)):
		r.log.Warn("health: "+e.Kind+" "+e.To, args...)
	case e.Kind == "member" && e.To == string(failover.MemberDead):
		r.log.Warn("health: member dead", args...)
	default:
		r.log.Info("health: "+e.Kind+" "+e.To, args...)
	}
}

// downEndpoints returns the keys of the registered endpoints whose
// sidecar gossip finds not up: down (dead, or held down after flapping)
// and left (a clean stop, served as draining). An endpoint no member
// matches is neither: its sidecar does not gossip.
func downEndpoints(v *failover.View, eps []store.Registration) (down, left []string) {
	type id struct{ unit, service, addr string }
	type seen struct{ up, left bool }
	by := map[id]seen{}
	for _, m := range v.Members {
		if m.Meta.Role != failover.RoleSidecar {
			continue
		}
		k := id{m.Meta.Unit, m.Meta.Service, m.Meta.Address}
		s := by[k]
		s.up = s.up || m.Up
		s.left = s.left || m.State == failover.MemberLeft
		by[k] = s
	}
	for _, e := range eps {
		s, ok := by[id{e.Unit, e.Service, e.Address}]
		switch {
		case !ok || s.up:
		case s.left:
			left = append(left, e.Key())
		default:
			down = append(down, e.Key())
		}
	}
	return down, left
}

// commitEndpointHealth commits the endpoints found down when they differ
// from the state's.
func (r *Replica) commitEndpointHealth(ctx context.Context, st *store.State) {
	v := r.health.View()
	down, left := downEndpoints(&v, st.Endpoints)
	var nowDown, nowLeft []string
	for _, e := range st.Endpoints {
		switch {
		case e.Down:
			nowDown = append(nowDown, e.Key())
		case e.Draining:
			nowLeft = append(nowLeft, e.Key())
		}
	}
	if slices.Equal(down, nowDown) && slices.Equal(left, nowLeft) {
		return
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := r.store.Apply(actx, store.Command{Op: store.OpHealth, Down: down, Draining: left, Who: "leader " + r.cfg.ID + " (gossip)", At: time.Now().UTC()}); err != nil {
		r.log.Warn("endpoint health not committed; retrying", "down", len(down), "left", len(left), "error", err)
		return
	}
	r.log.Info("endpoint health committed", "down", down, "left", left)
}

// unitLive reports whether gossip gives no sign that a unit is lost: a
// unit it finds suspect or down gets no lease renewal.
func unitLive(v *failover.View, unit string) bool {
	switch v.Unit(unit).State {
	case failover.StateSuspect, failover.StateDown:
		return false
	}
	return true
}
