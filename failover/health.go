package failover

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// UnitState is a unit's health as gossip shows it.
type UnitState string

// Unit and region states.
const (
	// StateUp: every member is alive.
	StateUp UnitState = "up"
	// StateDegraded: some members are alive, others are not.
	StateDegraded UnitState = "degraded"
	// StateSuspect: no member is alive, but the unit is not down yet: all
	// have been gone for less than the grace.
	StateSuspect UnitState = "suspect"
	// StateDown: no member has been alive for the grace time;
	// for a region, every unit with members is down.
	StateDown UnitState = "down"
	// StateUnknown: no member was ever seen (gossip not used there yet).
	StateUnknown UnitState = "unknown"
)

// HealthConfig tunes how member states add up to unit and region states.
// The zero value of a field means its default.
type HealthConfig struct {
	// Grace is how long every member of a unit must be gone (dead or
	// left) before the unit is down. Default 500ms: gossip has already
	// waited out its suspicion before it declares a member dead; the grace
	// only keeps a unit whose members all restart at once from flapping.
	Grace time.Duration
	// HoldDown damps flapping: a member that died and came back counts as
	// up again only after it has stayed alive this long, doubled for each
	// more death within FlapWindow, up to MaxHoldDown. A member never seen
	// dead counts at once. Defaults 2s, 2m and 1m.
	HoldDown, FlapWindow, MaxHoldDown time.Duration
	// Forget drops a dead or left member from the table after this long.
	// Default 10m.
	Forget time.Duration
	// MaxEvents bounds the event log. Default 1000.
	MaxEvents int
}

func (c HealthConfig) withDefaults() HealthConfig {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.Grace, 500*time.Millisecond)
	def(&c.HoldDown, 2*time.Second)
	def(&c.FlapWindow, 2*time.Minute)
	def(&c.MaxHoldDown, time.Minute)
	def(&c.Forget, 10*time.Minute)
	if c.MaxEvents <= 0 {
		c.MaxEvents = 1000
	}
	return c
}

// MemberHealth is a member with what its state means for its unit.
type MemberHealth struct {
	Member
	// Up: the member counts for its unit (alive, and not held
	// down after a flap).
	Up bool `json:"up"`
	// HeldUntil is when a member that came back after a death counts
	// again (zero when it is not held).
	HeldUntil time.Time `json:"held_until,omitzero"`
	// Deaths counts its deaths within the flap window.
	Deaths int `json:"deaths"`
}

// UnitHealth is one unit's health.
type UnitHealth struct {
	Unit    string    `json:"unit"`
	Region  string    `json:"region"`
	State   UnitState `json:"state"`
	Since   time.Time `json:"since"`
	Members int       `json:"members"`
	Up      int       `json:"up"`
}

// RegionHealth is one region's health.
type RegionHealth struct {
	Region string    `json:"region"`
	State  UnitState `json:"state"`
	Since  time.Time `json:"since"`
	Units  int       `json:"units"`
	Down   int       `json:"down"`
}

// Event is one change of a member, unit or region state.
type Event struct {
	Seq    uint64    `json:"seq"`
	At     time.Time `json:"at"`
	Kind   string    `json:"kind"` // member, unit, region
	Name   string    `json:"name"`
	Region string    `json:"region,omitempty"`
	Unit   string    `json:"unit,omitempty"`
	From   string    `json:"from"`
	To     string    `json:"to"`
	Reason string    `json:"reason,omitempty"`
}

// View is the health of every member, unit and region at one moment.
type View struct {
	At      time.Time      `json:"at"`
	Members []MemberHealth `json:"members"`
	Units   []UnitHealth   `json:"units"`
	Regions []RegionHealth `json:"regions"`
}

// Unit returns a unit's health (StateUnknown when it has none).
func (v *View) Unit(name string) UnitHealth {
	for _, u := range v.Units {
		if u.Unit == name {
			return u
		}
	}
	return UnitHealth{Unit: name, State: StateUnknown}
}

// Region returns a region's health.
func (v *View) Region(name string) RegionHealth {
	for _, r := range v.Regions {
		if r.Region == name {
			return r
		}
	}
	return RegionHealth{Region: name, State: StateUnknown}
}

// Health adds member states up to unit and region states, with a grace
// before a unit is down and damping of members that flap. It is safe for
// concurrent use; Observe does not block, so it can be a Membership's
// Observer. Time is passed in (now), so tests drive it without sleeping.
type Health struct {
	cfg     HealthConfig
	changed chan struct{}

	mu      sync.Mutex
	units   map[string]string // unit -> region, from the topology
	members map[string]*memberRec
	unitSt  map[string]*unitRec
	region  map[string]*unitRec
	events  []Event
	seq     uint64
	view    View
}

type memberRec struct {
	m      Member
	deaths []time.Time // within the flap window
	held   time.Time   // counts again from then
}

type unitRec struct {
	state     UnitState
	since     time.Time
	goneSince time.Time // when the last up member went (zero while one is up)
}

// NewHealth returns an empty Health.
func NewHealth(cfg HealthConfig) *Health {
	return &Health{
		cfg: cfg.withDefaults(), changed: make(chan struct{}, 1),
		units: map[string]string{}, members: map[string]*memberRec{},
		unitSt: map[string]*unitRec{}, region: map[string]*unitRec{},
	}
}

// Changed is signalled after a change of any state (capacity 1: a reader
// that was busy sees one signal for several changes).
func (h *Health) Changed() <-chan struct{} { return h.changed }

// SetUnits sets the topology's units (unit -> region) and evaluates.
func (h *Health) SetUnits(now time.Time, units map[string]string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.units = map[string]string{}
	for u, r := range units {
		h.units[u] = r
	}
	h.evaluate(now)
}

// Observe records a member's new state and evaluates.
func (h *Health) Observe(now time.Time, m Member) {
	h.mu.Lock()
	defer h.mu.Unlock()
	rec, ok := h.members[m.Name]
	if !ok {
		rec = &memberRec{}
		h.members[m.Name] = rec
	} else if rec.m.State == m.State && rec.m.Meta == m.Meta && rec.m.Gossip == m.Gossip {
		return
	}
	was := rec.m.State
	m.Since = now
	if ok && was == m.State {
		m.Since = rec.m.Since
	}
	if m.State == MemberDead && ok && was == MemberAlive {
		rec.deaths = append(rec.deaths, now)
	}
	if m.State == MemberAlive && ok && (was == MemberDead || was == MemberLeft) {
		rec.deaths = slices.DeleteFunc(rec.deaths, func(t time.Time) bool { return now.Sub(t) > h.cfg.FlapWindow })
		if n := len(rec.deaths); n > 0 {
			hold := h.cfg.HoldDown << min(n-1, 16)
			rec.held = now.Add(min(hold, h.cfg.MaxHoldDown))
		}
	}
	rec.m = m
	if was != m.State {
		from, reason := string(was), ""
		if from == "" {
			from = "new"
		}
		if m.State == MemberAlive && now.Before(rec.held) {
			reason = fmt.Sprintf("back after %d deaths in %s: held down until %s", len(rec.deaths), h.cfg.FlapWindow, rec.held.Format(time.RFC3339Nano))
		}
		h.event(now, Event{Kind: "member", Name: m.Name, Region: m.Meta.Region, Unit: m.Meta.Unit, From: from, To: string(m.State), Reason: reason})
	}
	h.evaluate(now)
}

// Tick evaluates the timers (grace, hold-down, forgetting); call it
// often (every probe interval).
func (h *Health) Tick(now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for name, rec := range h.members {
		if rec.m.up() || now.Sub(rec.m.Since) <= h.cfg.Forget {
			continue
		}
		if u := h.unitSt[rec.m.Meta.Unit]; u != nil && u.state == StateDown && rec.m.Meta.Role == RoleSidecar {
			// The unit's last word: forgetting it would make a lost unit
			// "unknown" again (and its endpoints up, its lease renewed).
			continue
		}
		delete(h.members, name)
	}
	h.evaluate(now)
}

// View returns the last evaluated health.
func (h *Health) View() View {
	h.mu.Lock()
	defer h.mu.Unlock()
	v := h.view
	v.Members = slices.Clone(v.Members)
	v.Units = slices.Clone(v.Units)
	v.Regions = slices.Clone(v.Regions)
	return v
}

// Events returns the logged events after seq (0: all kept).
func (h *Health) Events(after uint64) []Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	i, _ := slices.BinarySearchFunc(h.events, after+1, func(e Event, s uint64) int { return cmp.Compare(e.Seq, s) })
	return slices.Clone(h.events[i:])
}

func (h *Health) event(now time.Time, e Event) {
	h.seq++
	e.Seq, e.At = h.seq, now
	h.events = append(h.events, e)
	if len(h.events) > h.cfg.MaxEvents {
		h.events = slices.Clone(h.events[len(h.events)-h.cfg.MaxEvents:])
	}
	select {
	case h.changed <- struct{}{}:
	default:
	}
}

// evaluate recomputes every state at now; h.mu is held.
func (h *Health) evaluate(now time.Time) {
	type tally struct{ members, up int }
	per := map[string]*tally{}
	v := View{At: now}
	for _, rec := range h.members {
		held := !rec.held.IsZero() && now.Before(rec.held)
		if !held && !rec.held.IsZero() {
			rec.held = time.Time{}
			if rec.m.State == MemberAlive {
				h.event(now, Event{Kind: "member", Name: rec.m.Name, Region: rec.m.Meta.Region, Unit: rec.m.Meta.Unit,
					From: "held", To: "alive", Reason: "stayed alive through its hold-down: counts for its unit again"})
			}
		}
		up := rec.m.up() && !held
		mh := MemberHealth{Member: rec.m, Up: up, Deaths: len(rec.deaths)}
		if held {
			mh.HeldUntil = rec.held
		}
		v.Members = append(v.Members, mh)
		if rec.m.Meta.Role != RoleSidecar || rec.m.Meta.Unit == "" {
			continue
		}
		t := per[rec.m.Meta.Unit]
		if t == nil {
			t = &tally{}
			per[rec.m.Meta.Unit] = t
		}
		t.members++
		if up {
			t.up++
		}
	}
	slices.SortFunc(v.Members, func(a, b MemberHealth) int { return strings.Compare(a.Name, b.Name) })

	names := make([]string, 0, len(h.units))
	for u := range h.units {
		names = append(names, u)
	}
	slices.Sort(names)
	type rtally struct{ units, known, down, up int }
	rt := map[string]*rtally{}
	for _, u := range names {
		region := h.units[u]
		t := per[u]
		if t == nil {
			t = &tally{}
		}
		rec := h.unitSt[u]
		if rec == nil {
			rec = &unitRec{state: StateUnknown, since: now}
			h.unitSt[u] = rec
		}
		var next UnitState
		var reason string
		switch {
		case t.members == 0:
			next, reason = StateUnknown, "no member seen"
		case t.up == 0:
			if rec.goneSince.IsZero() {
				rec.goneSince = now
			}
			if now.Sub(rec.goneSince) >= h.cfg.Grace || rec.state == StateDown {
				next, reason = StateDown, fmt.Sprintf("no member alive for %s", h.cfg.Grace)
			} else {
				next, reason = StateSuspect, "no member alive; within the grace"
			}
		default:
			rec.goneSince = time.Time{}
			if t.up == t.members {
				next, reason = StateUp, "every member alive"
			} else {
				next, reason = StateDegraded, fmt.Sprintf("%d of %d members up", t.up, t.members)
			}
		}
		if next != rec.state {
			h.event(now, Event{Kind: "unit", Name: u, Region: region, Unit: u, From: string(rec.state), To: string(next), Reason: reason})
			rec.state, rec.since = next, now
		}
		v.Units = append(v.Units, UnitHealth{Unit: u, Region: region, State: rec.state, Since: rec.since, Members: t.members, Up: t.up})
		r := rt[region]
		if r == nil {
			r = &rtally{}
			rt[region] = r
		}
		r.units++
		if rec.state != StateUnknown {
			r.known++
		}
		switch rec.state {
		case StateDown:
			r.down++
		case StateUp:
			r.up++
		}
	}
	for u := range h.unitSt {
		if _, ok := h.units[u]; !ok {
			delete(h.unitSt, u)
		}
	}
	regions := make([]string, 0, len(rt))
	for r := range rt {
		regions = append(regions, r)
	}
	slices.Sort(regions)
	for _, name := range regions {
		t := rt[name]
		next := StateDegraded
		switch {
		case t.known == 0:
			next = StateUnknown
		case t.down == t.known:
			next = StateDown
		case t.up == t.known:
			next = StateUp
		}
		rec := h.region[name]
		if rec == nil {
			rec = &unitRec{state: StateUnknown, since: now}
			h.region[name] = rec
		}
		if next != rec.state {
			h.event(now, Event{Kind: "region", Name: name, Region: name, From: string(rec.state), To: string(next),
				Reason: fmt.Sprintf("%d of %d units with members down", t.down, t.known)})
			rec.state, rec.since = next, now
		}
		v.Regions = append(v.Regions, RegionHealth{Region: name, State: rec.state, Since: rec.since, Units: t.units, Down: t.down})
	}
	for r := range h.region {
		if _, ok := rt[r]; !ok {
			delete(h.region, r)
		}
	}
	h.view = v
}
