package routing

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"sync/atomic"
)

// ShardMap is an immutable, validated, versioned snapshot of a topology,
// indexed for O(1) lookup. Many goroutines may read one at once; owners
// replace it whole (see Live), never modify it.
type ShardMap struct {
	topo    *Topology // private deep copy; never modified
	version uint64
	n       int
	rule    ShardRule
	keys    []keySource
	zones   []zoneRule
	defZone Zone

	units     []Unit
	unitIndex map[string]int
	// czone[r] is a czone unit of region r.
	czone map[string]int

	slots  []slot // by shard
	global slot   // valid when hasGlobal
	hasGlb bool
}

type slot struct {
	primary  int32 // index into units
	epoch    uint64
	state    State
	standbys []int32
}

// Compile validates t and builds its ShardMap. The map keeps its own copy of
// t: later changes to t do not reach it.
func Compile(t *Topology) (*ShardMap, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	t = t.Clone()
	m := &ShardMap{
		topo:      t,
		version:   t.Version,
		n:         t.ShardCount(),
		rule:      t.Rule,
		defZone:   t.Zones.defaultZone(),
		units:     t.Units,
		unitIndex: make(map[string]int, len(t.Units)),
		czone:     map[string]int{},
	}
	if m.rule.Kind == "" {
		m.rule.Kind = RuleMod
	}
	keys := t.Keys
	if len(keys) == 0 {
		keys = []KeySource{{Kind: KeyHeader, Name: DefaultKeyHeader}}
	}
	for _, k := range keys {
		ks, err := compileKeySource(k)
		if err != nil { // Validate has refused it already
			return nil, err
		}
		m.keys = append(m.keys, ks)
	}
	for _, r := range t.Zones.Rules {
		zr, err := compileZoneRule(r)
		if err != nil { // Validate has refused it already
			return nil, err
		}
		m.zones = append(m.zones, zr)
	}
	for i, u := range t.Units {
		m.unitIndex[u.Name] = i
		if _, ok := m.czone[u.Region]; !ok && u.Kind == KindCZone {
			m.czone[u.Region] = i
		}
	}
	m.slots = make([]slot, m.n)
	for _, a := range t.Assignments {
		s := slot{primary: int32(m.unitIndex[a.Primary]), epoch: a.Epoch, state: a.State}
		for _, sb := range a.Standbys {
			s.standbys = append(s.standbys, int32(m.unitIndex[sb]))
		}
		if a.Shard == GlobalShard {
			m.global, m.hasGlb = s, true
		} else {
			m.slots[a.Shard] = s
		}
	}
	return m, nil
}

// Version returns the topology version of the map.
func (m *ShardMap) Version() uint64 { return m.version }

// Shards returns the shard count N.
func (m *ShardMap) Shards() int { return m.n }

// Topology returns a deep copy of the topology the map was compiled from.
func (m *ShardMap) Topology() *Topology { return m.topo.Clone() }

// Unit returns the declared unit of that name.
func (m *ShardMap) Unit(name string) (Unit, bool) {
	i, ok := m.unitIndex[name]
	if !ok {
		return Unit{}, false
	}
	return m.units[i], true
}

// Owner is where a shard lives now.
type Owner struct {
	Shard    int
	Unit     string
	Region   string
	Epoch    uint64
	State    State
	Standbys []string
}

// UnknownShardError reports a shard outside 0..N-1, or a global lookup in a
// topology without a gzone writer.
type UnknownShardError struct {
	Shard int
	N     int
}

func (e *UnknownShardError) Error() string {
	if e.Shard == GlobalShard {
		return "no global assignment: the topology has no gzone writer"
	}
	return fmt.Sprintf("unknown shard %d: shards are 0..%d", e.Shard, e.N-1)
}

// Lookup returns the owner of a shard (GlobalShard for the gzone writer) in
// O(1).
func (m *ShardMap) Lookup(shard int) (Owner, error) {
	s, err := m.slot(shard)
	if err != nil {
		return Owner{}, err
	}
	u := &m.units[s.primary]
	return Owner{Shard: shard, Unit: u.Name, Region: u.Region, Epoch: s.epoch, State: s.state,
		Standbys: m.standbyNames(s)}, nil
}

func (m *ShardMap) slot(shard int) (*slot, error) {
	if shard == GlobalShard && m.hasGlb {
		return &m.global, nil
	}
	if shard < 0 || shard >= m.n {
		return nil, &UnknownShardError{Shard: shard, N: m.n}
	}
	return &m.slots[shard], nil
}

// slotPrimary and slotStandbys return a shard's primary and standbys as
// unit indexes (shard must be valid).
func (m *ShardMap) slotPrimary(shard int) int32 {
	s, _ := m.slot(shard)
	return s.primary
}

func (m *ShardMap) slotStandbys(shard int) []int32 {
	s, _ := m.slot(shard)
	return s.standbys
}

func (m *ShardMap) standbyNames(s *slot) []string {
	if len(s.standbys) == 0 {
		return nil
	}
	out := make([]string, len(s.standbys))
	for i, u := range s.standbys {
		out[i] = m.units[u].Name
	}
	return out
}

// Decision says where one request goes.
type Decision struct {
	// Shard is the user's shard, or GlobalShard when the route is not
	// user-sharded (gzone and czone).
	Shard  int
	Zone   Zone
	Unit   string
	Region string
	// Epoch is the epoch of the shard (or of the global assignment); zero for czone.
	Epoch uint64
	State State
	// Write reports whether the request is a write under the zone rules.
	Write bool
	// Key is the user key the decision used, "" when none was needed.
	Key string
	// LocalFallback: the route needs a user key, the request has none, and
	// it goes to the deciding sidecar's own unit (Request.LocalUnit), as
	// DESIGN.md orders. Shard is GlobalShard and Epoch zero: nothing to fence.
	LocalFallback bool
}

// KeyError says why a request's key could not be mapped to a shard. It wraps
// ErrNoKey, ErrNonNumericKey, ErrKeyTooLong, ErrAmbiguousKey or a decoding error.
type KeyError struct {
	Source KeySource // the source that gave the key; zero for ErrNoKey
	Key    string
	Err    error
}

func (e *KeyError) Error() string {
	switch {
	case errors.Is(e.Err, ErrNoKey):
		return "no user key in the request"
	case e.Key != "":
		k := e.Key
		if len(k) > 64 {
			k = k[:64] + "..."
		}
		return fmt.Sprintf("user key %q from %s: %v", k, e.Source, e.Err)
	}
	return fmt.Sprintf("user key from %s: %v", e.Source, e.Err)
}

func (e *KeyError) Unwrap() error { return e.Err }

// ErrNoLocalUnit: a czone route needs the deciding sidecar's unit.
var ErrNoLocalUnit = errors.New("czone route needs the local unit")

// Key returns the user key of r from the first key source that has one, and
// the source. It returns ("", zero, nil) when no source has a key.
func (m *ShardMap) Key(r *Request) (string, KeySource, error) {
	v, i, err := m.key(r)
	if i < 0 {
		return v, KeySource{}, err
	}
	return v, m.keySource(i), err
}

// key returns the key and the index of the source that gave it (or failed),
// -1 when no source has a key.
func (m *ShardMap) key(r *Request) (string, int, error) {
	for i := range m.keys {
		v, err := m.keys[i].extract(r)
		if err != nil || v != "" {
			return v, i, err
		}
	}
	return "", -1, nil
}

func (m *ShardMap) keySource(i int) KeySource {
	return KeySource{Kind: m.keys[i].kind, Name: m.keyName(i)}
}

func (m *ShardMap) keyName(i int) string {
	if len(m.topo.Keys) == 0 {
		return DefaultKeyHeader
	}
	return m.topo.Keys[i].Name
}

// Zone returns the zone of r and whether it is a write, from the zone rules.
func (m *ShardMap) Zone(r *Request) (Zone, bool) {
	upper := isUpper(r.Method)
	for i := range m.zones {
		z := &m.zones[i]
		if z.match(r, upper) {
			if z.write >= 0 {
				return z.zone, z.write == 1
			}
			return z.zone, IsWriteMethod(r.Method)
		}
	}
	return m.defZone, IsWriteMethod(r.Method)
}

// Decide returns where r goes: rzone routes to the primary of the key's
// shard, gzone to the global writer, czone to a czone unit of the local
// unit's region (or the local unit). A request with no key where one is
// needed goes to the local unit (LocalFallback) when r.LocalUnit is set.
// Errors are *KeyError (no key and no local unit, non-numeric key under mod
// or digits, key too long, ambiguous, bad encoding), *UnknownShardError, or
// ErrNoLocalUnit. It does not allocate when the key needs no unescaping.
func (m *ShardMap) Decide(r *Request) (d Decision, err error) {
	d.Zone, d.Write = m.Zone(r)
	d.Shard = GlobalShard
	switch d.Zone {
	case KindGZone:
		s, err := m.slot(GlobalShard)
		if err != nil {
			return d, err
		}
		u := &m.units[s.primary]
		d.Unit, d.Region, d.Epoch, d.State = u.Name, u.Region, s.epoch, s.state
		return d, nil
	case KindCZone:
		li, ok := m.unitIndex[r.LocalUnit]
		if !ok {
			return d, ErrNoLocalUnit
		}
		u := &m.units[li]
		if ci, ok := m.czone[u.Region]; ok && u.Kind != KindCZone {
			u = &m.units[ci]
		}
		d.Unit, d.Region, d.State = u.Name, u.Region, StateServing
		return d, nil
	}
	key, src, err := m.key(r)
	if err != nil {
		return d, &KeyError{Source: m.keySource(src), Err: err}
	}
	if key == "" {
		// DESIGN: a request without a user key goes to the local unit.
		li, ok := m.unitIndex[r.LocalUnit]
		if !ok {
			return d, &KeyError{Err: ErrNoKey}
		}
		u := &m.units[li]
		d.Unit, d.Region, d.State, d.LocalFallback = u.Name, u.Region, StateServing, true
		return d, nil
	}
	shard, err := m.rule.shardOf(key, m.n)
	if err != nil {
		return d, &KeyError{Source: m.keySource(src), Key: key, Err: err}
	}
	s := &m.slots[shard]
	u := &m.units[s.primary]
	d.Shard, d.Unit, d.Region, d.Epoch, d.State, d.Key = shard, u.Name, u.Region, s.epoch, s.state, key
	return d, nil
}

// ShardOf maps a user key to its shard under the map's rule.
func (m *ShardMap) ShardOf(key string) (int, error) { return m.rule.shardOf(key, m.n) }

// StaleVersionError is returned by Live.Store for a map older than the one held.
type StaleVersionError struct {
	Have, Got uint64
}

func (e *StaleVersionError) Error() string {
	return fmt.Sprintf("shard map version %d is older than the current version %d", e.Got, e.Have)
}

// Live holds the current ShardMap of its owner. Readers call Load on every
// request and keep reading the map they got while the owner stores a new one.
// The zero value holds no map.
type Live struct {
	p atomic.Pointer[ShardMap]
}

// Load returns the current map, or nil before the first Store.
func (l *Live) Load() *ShardMap { return l.p.Load() }

// Store makes m current. Versions only move forward: a map with a lower
// version than the current one is refused with *StaleVersionError; the same
// version replaces the current map.
func (l *Live) Store(m *ShardMap) error {
	if m == nil {
		return errors.New("store a nil shard map")
	}
	for {
		old := l.p.Load()
		if old != nil && m.version < old.version {
			return &StaleVersionError{Have: old.version, Got: m.version}
		}
		if l.p.CompareAndSwap(old, m) {
			return nil
		}
	}
}

// SuccessorError says why a map may not follow the current one.
type SuccessorError struct {
	Shard int // GlobalShard for the gzone writer, -2 when no shard is concerned
	Msg   string
}

func (e *SuccessorError) Error() string { return e.Msg }

// noShard marks a SuccessorError about the whole map.
const noShard = -2

// CheckSuccessor reports whether next may replace m where requests are
// fenced by epoch: its version is not lower; the same version means the
// same topology; the shard count is the same; no shard's epoch falls; and
// a shard whose primary changes gets a higher epoch. A map breaking these
// would let a fenced sender through again, or two units accept one epoch.
func (m *ShardMap) CheckSuccessor(next *ShardMap) error {
	switch {
	case next.version < m.version:
		return &SuccessorError{noShard, fmt.Sprintf("shard map version %d is older than the current version %d", next.version, m.version)}
	case next.version == m.version:
		if !reflect.DeepEqual(m.topo, next.topo) {
			return &SuccessorError{noShard, fmt.Sprintf("shard map version %d differs from the current map of the same version: bump the version with every change", next.version)}
		}
		return nil
	case next.n != m.n:
		return &SuccessorError{noShard, fmt.Sprintf("shard count changes from %d to %d: it is fixed for the life of a topology", m.n, next.n)}
	}
	check := func(shard int, a, b *slot) error {
		ua, ub := m.units[a.primary].Name, next.units[b.primary].Name
		name := "shard " + strconv.Itoa(shard)
		if shard == GlobalShard {
			name = "the global assignment"
		}
		if b.epoch < a.epoch {
			return &SuccessorError{shard, fmt.Sprintf("%s: epoch falls from %d to %d in version %d", name, a.epoch, b.epoch, next.version)}
		}
		if ua != ub && b.epoch == a.epoch {
			return &SuccessorError{shard, fmt.Sprintf("%s: primary changes from %s to %s at the same epoch %d in version %d: a change of primary must raise the epoch", name, ua, ub, a.epoch, next.version)}
		}
		return nil
	}
	for i := range m.slots {
		if err := check(i, &m.slots[i], &next.slots[i]); err != nil {
			return err
		}
	}
	if m.hasGlb && next.hasGlb {
		return check(GlobalShard, &m.global, &next.global)
	}
	return nil
}
