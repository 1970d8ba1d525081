package routing

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Limits on the shard count N.
const (
	DefaultShards = 100
	MaxShards     = 65536
)

// MaxCounter bounds versions and epochs so that they can always rise.
const MaxCounter = 1 << 62

// GlobalShard is the shard number of the global assignment: the gzone writer
// unit, moved by the same handoff protocol as any shard.
const GlobalShard = -1

// Kind is the kind of a unit.
type Kind string

// Unit kinds.
const (
	// KindRZone units hold user-sharded data: each owns a set of shards.
	KindRZone Kind = "rzone"
	// KindGZone units hold global data; one of them is the writer at a time.
	KindGZone Kind = "gzone"
	// KindCZone units hold a city-local read copy of global data.
	KindCZone Kind = "czone"
)

func (k Kind) valid() bool { return k == KindRZone || k == KindGZone || k == KindCZone }

// State is the state of an assignment.
type State string

// Assignment states.
const (
	// StateServing: the primary takes reads and writes.
	StateServing State = "serving"
	// StateDraining: a planned handoff holds new writes until it ends.
	StateDraining State = "draining"
	// StateBlocked: a handoff could not prove that no acknowledged write would
	// be lost; an operator must act.
	StateBlocked State = "blocked"
)

func (s State) valid() bool { return s == StateServing || s == StateDraining || s == StateBlocked }

// Region is a datacenter site or cloud region.
type Region struct {
	Name string
}

// Unit is a cell: a full set of services for a subset of users, in one region.
type Unit struct {
	Name   string `json:"name"`
	Region string `json:"region"`
	Kind   Kind   `json:"kind"`
	// CapacityRPS is the request rate the unit is declared to carry. The
	// capacity-headroom safety rule compares measured load against it.
	CapacityRPS float64 `json:"capacity_rps"`
}

// Assignment gives a shard (or, with Shard == GlobalShard, the global gzone
// writer) its primary unit, its ordered standby units, its epoch and state.
type Assignment struct {
	Shard    int
	Primary  string
	Standbys []string
	// Epoch is bumped on every change of primary. It starts at 1.
	Epoch uint64
	State State
}

// Safety holds the limits every plan is checked against before it runs.
// The zero value of each field means its default.
type Safety struct {
	// MaxUtilization is the fraction of a unit's declared capacity that its
	// measured load may reach after a plan. Default 0.8.
	MaxUtilization float64
	// MinServingUnits is the number of rzone units that must still own shards
	// after a plan. Default 1.
	MinServingUnits int
	// MaxShardsInFlight bounds how many shards one wave of a plan moves at
	// once. Default 10.
	MaxShardsInFlight int
	// AllowNoCrossRegionStandby turns off the rule that every shard keeps a
	// standby in another region whenever an available unit there could hold
	// one. Off by default: the rule holds.
	AllowNoCrossRegionStandby bool
}

// Defaults of Safety.
const (
	DefaultMaxUtilization    = 0.8
	DefaultMinServingUnits   = 1
	DefaultMaxShardsInFlight = 10
)

func (s Safety) withDefaults() Safety {
	if s.MaxUtilization == 0 {
		s.MaxUtilization = DefaultMaxUtilization
	}
	if s.MinServingUnits == 0 {
		s.MinServingUnits = DefaultMinServingUnits
	}
	if s.MaxShardsInFlight == 0 {
		s.MaxShardsInFlight = DefaultMaxShardsInFlight
	}
	return s
}

// Topology is the declared shape of the mesh. It is plain data: Validate
// checks it and Compile turns it into a ShardMap.
type Topology struct {
	// Version only moves forward; every applied plan bumps it.
	Version uint64
	// Shards is the shard count N, fixed when the topology is created.
	// 0 means DefaultShards.
	Shards int
	Rule   ShardRule
	// Keys lists where the user key is taken from, first match wins. Empty
	// means the header x-cellmesh-uid.
	Keys   []KeySource
	Zones  ZoneRules
	Safety Safety

	Regions     []Region
	Units       []Unit
	Assignments []Assignment
}

// ShardCount returns N, with the default applied.
func (t *Topology) ShardCount() int {
	if t.Shards == 0 {
		return DefaultShards
	}
	return t.Shards
}

// Clone returns a deep copy of t.
func (t *Topology) Clone() *Topology {
	c := *t
	c.Keys = slices.Clone(t.Keys)
	c.Rule.Digits = slices.Clone(t.Rule.Digits)
	c.Zones.Rules = slices.Clone(t.Zones.Rules)
	for i := range c.Zones.Rules {
		c.Zones.Rules[i].Methods = slices.Clone(c.Zones.Rules[i].Methods)
	}
	c.Regions = slices.Clone(t.Regions)
	c.Units = slices.Clone(t.Units)
	c.Assignments = slices.Clone(t.Assignments)
	for i := range c.Assignments {
		c.Assignments[i].Standbys = slices.Clone(c.Assignments[i].Standbys)
	}
	return &c
}

// Problem is one thing wrong with a topology. Subject names the region, unit,
// shard or field it is about, as in `unit "us-east-1"` or `shard 7`.
type Problem struct {
	Subject string `json:"subject"`
	Message string `json:"message"`
}

func (p Problem) String() string { return p.Subject + ": " + p.Message }

// ValidationError lists every problem found in a topology at once.
type ValidationError struct {
	Problems []Problem
}

func (e *ValidationError) Error() string {
	if len(e.Problems) == 1 {
		return "invalid topology: " + e.Problems[0].String()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "invalid topology: %d problems:", len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  ")
		b.WriteString(p.String())
	}
	return b.String()
}

type problems []Problem

func (ps *problems) add(subject, format string, args ...any) {
	*ps = append(*ps, Problem{Subject: subject, Message: fmt.Sprintf(format, args...)})
}

func unitSubject(name string) string   { return fmt.Sprintf("unit %q", name) }
func regionSubject(name string) string { return fmt.Sprintf("region %q", name) }

// ShardName returns "shard 7", or "global" for GlobalShard.
func ShardName(shard int) string {
	if shard == GlobalShard {
		return "global"
	}
	return fmt.Sprintf("shard %d", shard)
}

// ValidName reports whether s can name a region or unit: 1 to 63 characters,
// lowercase letters, digits and '-', starting with a letter and not ending
// with '-'. Names travel in headers and metric labels.
func ValidName(s string) bool {
	if len(s) == 0 || len(s) > 63 || s[0] < 'a' || s[0] > 'z' || s[len(s)-1] == '-' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Validate checks t and returns a *ValidationError listing every problem, or
// nil when t is valid.
func (t *Topology) Validate() error {
	var ps problems
	n := t.ShardCount()
	if n < 1 || n > MaxShards {
		ps.add("shards", "shard count %d is out of range 1..%d", t.Shards, MaxShards)
		n = 0 // skip per-shard checks below
	}
	if t.Version == 0 {
		ps.add("version", "version must be 1 or more")
	} else if t.Version >= MaxCounter {
		ps.add("version", "version %d is too large (it must stay below 2^62, so that it can always rise)", t.Version)
	}
	t.Rule.validate(n, &ps)
	validateKeys(t.Keys, &ps)
	t.Zones.validate(&ps)
	validateSafety(t.Safety, &ps)

	regions := make(map[string]bool, len(t.Regions))
	for i, r := range t.Regions {
		switch {
		case r.Name == "":
			ps.add(fmt.Sprintf("regions[%d]", i), "region has no name")
		case !ValidName(r.Name):
			ps.add(regionSubject(r.Name), "invalid name: use 1-63 lowercase letters, digits and '-', starting with a letter")
		case regions[r.Name]:
			ps.add(regionSubject(r.Name), "declared twice")
		}
		regions[r.Name] = true
	}
	if len(t.Regions) == 0 {
		ps.add("regions", "no region declared")
	}

	units := make(map[string]*Unit, len(t.Units))
	kindRegions := map[Kind]map[string]bool{KindRZone: {}, KindGZone: {}, KindCZone: {}}
	for i := range t.Units {
		u := &t.Units[i]
		if u.Name == "" {
			ps.add(fmt.Sprintf("units[%d]", i), "unit has no name")
			continue
		}
		validateUnit(*u, regions, units[u.Name] != nil, &ps)
		if units[u.Name] == nil {
			units[u.Name] = u
		}
		if u.Kind.valid() && regions[u.Region] {
			kindRegions[u.Kind][u.Region] = true
		}
	}
	if len(kindRegions[KindRZone]) == 0 {
		ps.add("units", "no rzone unit declared: shards need a unit to live in")
	}
	if len(kindRegions[KindCZone]) > 0 && len(kindRegions[KindGZone]) == 0 {
		for _, u := range t.Units {
			if u.Kind == KindCZone {
				ps.add(unitSubject(u.Name), "czone unit without a gzone unit: a czone is a read copy of gzone data")
			}
		}
	}
	withUnits := make(map[string]bool, len(t.Regions))
	for _, u := range t.Units {
		withUnits[u.Region] = true
	}
	for _, r := range t.Regions {
		if r.Name != "" && !withUnits[r.Name] {
			ps.add(regionSubject(r.Name), "has no unit")
		}
	}

	seen := make([]bool, n)
	globals := 0
	for i := range t.Assignments {
		a := &t.Assignments[i]
		subj := ShardName(a.Shard)
		want := KindRZone
		switch {
		case a.Shard == GlobalShard:
			want = KindGZone
			globals++
			if globals == 2 {
				ps.add(subj, "more than one gzone writer: the global assignment is declared %d times", countGlobal(t.Assignments))
			}
			if len(kindRegions[KindGZone]) == 0 {
				ps.add(subj, "a global assignment needs gzone units")
				continue
			}
		case a.Shard < 0 || a.Shard >= n:
			if n > 0 {
				ps.add(subj, "out of range 0..%d", n-1)
			}
			continue
		case seen[a.Shard]:
			ps.add(subj, "assigned twice")
			continue
		default:
			seen[a.Shard] = true
		}
		validateAssignment(a, want, units, kindRegions[want], t.Safety.AllowNoCrossRegionStandby, &ps)
	}
	for s := 0; s < len(seen); s++ {
		if seen[s] {
			continue
		}
		e := s
		for e+1 < len(seen) && !seen[e+1] {
			e++
		}
		if e == s {
			ps.add(ShardName(s), "has no primary")
		} else {
			ps.add(fmt.Sprintf("shards %d-%d", s, e), "have no primary")
		}
		s = e
	}
	if t.Zones.defaultZone() == KindGZone && globals == 0 {
		ps.add("zones", "default zone is gzone but the topology has no global assignment (gzone writer)")
	}
	for i, r := range t.Zones.Rules {
		if r.Zone == KindGZone && globals == 0 {
			ps.add(fmt.Sprintf("zones.rules[%d]", i), "routes to gzone but the topology has no global assignment (gzone writer)")
		}
	}
	if globals == 0 && len(kindRegions[KindGZone]) > 0 {
		ps.add("global", "gzone units are declared but no global assignment names the writer")
	}
	if len(ps) > 0 {
		return &ValidationError{Problems: ps}
	}
	return nil
}

// validateUnit checks one unit's own fields against the declared regions;
// dup says whether an earlier unit has its name.
func validateUnit(u Unit, regions map[string]bool, dup bool, ps *problems) {
	subj := unitSubject(u.Name)
	switch {
	case !ValidName(u.Name):
		ps.add(subj, "invalid name: use 1-63 lowercase letters, digits and '-', starting with a letter")
	case dup:
		ps.add(subj, "declared twice")
	case regions[u.Name]:
		ps.add(subj, "has the name of a region; give units their own names")
	}
	if u.Region == "" {
		ps.add(subj, "has no region")
	} else if !regions[u.Region] {
		ps.add(subj, "region %q is not declared", u.Region)
	}
	if !u.Kind.valid() {
		ps.add(subj, "kind %q is unknown (want rzone, gzone or czone)", u.Kind)
	}
	if !(u.CapacityRPS > 0) || u.CapacityRPS > 1e12 {
		ps.add(subj, "capacity_rps %v must be a positive request rate", u.CapacityRPS)
	}
}

func countGlobal(as []Assignment) int {
	c := 0
	for _, a := range as {
		if a.Shard == GlobalShard {
			c++
		}
	}
	return c
}

func validateAssignment(a *Assignment, want Kind, units map[string]*Unit, kindRegions map[string]bool, sameRegionOK bool, ps *problems) {
	subj := ShardName(a.Shard)
	if a.Epoch == 0 {
		ps.add(subj, "epoch must be 1 or more")
	} else if a.Epoch >= MaxCounter {
		ps.add(subj, "epoch %d is too large (it must stay below 2^62, so that it can always rise)", a.Epoch)
	}
	if !a.State.valid() {
		ps.add(subj, "state %q is unknown (want serving, draining or blocked)", a.State)
	}
	checkUnit := func(role, name string) *Unit {
		if name == "" {
			ps.add(subj, "has no %s", role)
			return nil
		}
		u := units[name]
		if u == nil {
			ps.add(subj, "%s %q is not a declared unit", role, name)
			return nil
		}
		if u.Kind != want {
			ps.add(subj, "%s %q is a %s unit; this assignment needs a %s unit", role, name, u.Kind, want)
			return nil
		}
		return u
	}
	p := checkUnit("primary", a.Primary)
	seen := map[string]bool{a.Primary: true}
	cross := false
	for _, s := range a.Standbys {
		if seen[s] {
			if s == a.Primary {
				ps.add(subj, "standby %q is also the primary", s)
			} else {
				ps.add(subj, "standby %q is listed twice", s)
			}
			continue
		}
		seen[s] = true
		if su := checkUnit("standby", s); su != nil && p != nil && su.Region != p.Region {
			cross = true
		}
	}
	if p != nil && !cross && !sameRegionOK {
		for _, r := range sortedKeys(kindRegions) {
			if r != p.Region {
				ps.add(subj, "no standby in another region than %q, though region %q has %s units", p.Region, r, want)
				break
			}
		}
	}
}

func validateSafety(s Safety, ps *problems) {
	if s.MaxUtilization < 0 || s.MaxUtilization > 1 || s.MaxUtilization != s.MaxUtilization {
		ps.add("safety", "max_utilization %v must be in (0, 1]", s.MaxUtilization)
	}
	if s.MinServingUnits < 0 {
		ps.add("safety", "min_serving_units %d must not be negative", s.MinServingUnits)
	}
	if s.MaxShardsInFlight < 0 {
		ps.add("safety", "max_shards_in_flight %d must not be negative", s.MaxShardsInFlight)
	}
}

// sortedKeys returns the keys of m in order, for deterministic messages.
func sortedKeys[K cmp.Ordered, V any](m map[K]V) []K {
	ks := make([]K, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
