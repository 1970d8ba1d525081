package routing_test

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/google/go-cmp/cmp"
)

type decideCase struct {
	name string
	req  *routing.Request
	want routing.Decision
}

func runDecideCases(t *testing.T, m *routing.ShardMap, tests []decideCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := m.Decide(tc.req)
			if err != nil {
				t.Fatalf("Decide: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("Decide (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDecide(t *testing.T) {
	m := mustCompile(t, validTopology())
	uid := func(method, path, uid, local string) *routing.Request {
		return &routing.Request{Method: method, Path: path, Header: header("X-Cellmesh-Uid", uid), LocalUnit: local}
	}
	tests := []decideCase{
		{"rzone/read", uid("GET", "/v1/orders", "4", "west-1"),
			routing.Decision{Shard: 0, Zone: routing.KindRZone, Unit: "east-1", Region: "east", Epoch: 1, State: routing.StateServing, Key: "4"}},
		{"rzone/write", uid("POST", "/v1/orders", "6", "east-1"),
			routing.Decision{Shard: 2, Zone: routing.KindRZone, Unit: "west-1", Region: "west", Epoch: 3, State: routing.StateServing, Write: true, Key: "6"}},
		{"rzone/draining-shard", uid("PUT", "/v1/orders", "2088123456787", ""),
			routing.Decision{Shard: 3, Zone: routing.KindRZone, Unit: "west-1", Region: "west", Epoch: 1, State: routing.StateDraining, Write: true, Key: "2088123456787"}},
		{"rzone/key-from-cookie", &routing.Request{Method: "GET", Path: "/", Header: header("Cookie", "uid=5")},
			routing.Decision{Shard: 1, Zone: routing.KindRZone, Unit: "east-1", Region: "east", Epoch: 1, State: routing.StateServing, Key: "5"}},
		{"gzone/write", uid("POST", "/v1/config/fx", "6", "west-1"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindGZone, Unit: "east-g", Region: "east", Epoch: 2, State: routing.StateServing, Write: true}},
		{"gzone/needs-no-key", &routing.Request{Method: "DELETE", Path: "/v1/config/fx"},
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindGZone, Unit: "east-g", Region: "east", Epoch: 2, State: routing.StateServing, Write: true}},
		{"czone/rzone-local-goes-to-region-czone", uid("GET", "/v1/config/fx", "6", "east-1"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "east-c", Region: "east", State: routing.StateServing}},
		{"czone/gzone-local-goes-to-region-czone", uid("GET", "/v1/config/fx", "6", "east-g"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "east-c", Region: "east", State: routing.StateServing}},
		{"czone/czone-local-stays", uid("HEAD", "/v1/config/fx", "", "east-c"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "east-c", Region: "east", State: routing.StateServing}},
		{"czone/region-without-czone-stays-local", uid("GET", "/v1/config/fx", "6", "west-1"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "west-1", Region: "west", State: routing.StateServing}},
		{"czone/region-without-czone-gzone-local", uid("GET", "/v1/config/fx", "", "west-g"),
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "west-g", Region: "west", State: routing.StateServing}},
	}
	runDecideCases(t, m, tests)
}

func TestDecideExample(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	tests := []decideCase{
		{"header", &routing.Request{Method: "POST", Path: "/v1/transfers", Header: header("X-Cellmesh-Uid", "2088123456789"), LocalUnit: "us-east-1"},
			routing.Decision{Shard: 89, Zone: routing.KindRZone, Unit: "ap-south-2", Region: "ap-south", Epoch: 1, State: routing.StateServing, Write: true, Key: "2088123456789"}},
		{"path", &routing.Request{Method: "GET", Path: "/v1/users/2088123456717/orders", LocalUnit: "us-east-1"},
			routing.Decision{Shard: 17, Zone: routing.KindRZone, Unit: "us-east-2", Region: "us-east", Epoch: 1, State: routing.StateServing, Key: "2088123456717"}},
		{"czone-read", &routing.Request{Method: "GET", Path: "/v1/config/fx", LocalUnit: "eu-west-2"},
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "eu-west-c", Region: "eu-west", State: routing.StateServing}},
		{"gzone-write", &routing.Request{Method: "PUT", Path: "/v1/config/fx", LocalUnit: "ap-south-1"},
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindGZone, Unit: "us-east-g", Region: "us-east", Epoch: 1, State: routing.StateServing, Write: true}},
		{"quote-is-a-czone-read", &routing.Request{Method: "POST", Path: "/v1/fx/usd/quote", LocalUnit: "ap-south-1"},
			routing.Decision{Shard: routing.GlobalShard, Zone: routing.KindCZone, Unit: "ap-south-c", Region: "ap-south", State: routing.StateServing}},
	}
	runDecideCases(t, m, tests)
}

// Every rzone decision agrees with Lookup of its shard.
func TestDecideAgreesWithLookup(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	for i := range 1000 {
		key := fmt.Sprintf("20881234%05d", i*37)
		d, err := m.Decide(&routing.Request{Method: "GET", Path: "/", Header: header("X-Cellmesh-Uid", key)})
		if err != nil {
			t.Fatalf("Decide(%s): %v", key, err)
		}
		o, err := m.Lookup(d.Shard)
		if err != nil {
			t.Fatalf("Lookup(%d): %v", d.Shard, err)
		}
		if d.Unit != o.Unit || d.Region != o.Region || d.Epoch != o.Epoch || d.State != o.State {
			t.Fatalf("Decide(%s) = %+v, but Lookup(%d) = %+v", key, d, d.Shard, o)
		}
	}
}

func TestDecideErrors(t *testing.T) {
	m := mustCompile(t, validTopology())
	tests := []struct {
		name     string
		req      *routing.Request
		sentinel error             // errors.Is target; nil for none
		keyErr   *routing.KeyError // the KeyError expected, Err compared by errors.Is
	}{
		{name: "no-key", req: &routing.Request{Method: "GET", Path: "/v1/orders", Header: http.Header{}},
			sentinel: routing.ErrNoKey, keyErr: &routing.KeyError{Err: routing.ErrNoKey}},
		{name: "no-key/nil-header", req: &routing.Request{Method: "GET", Path: "/v1/orders"},
			sentinel: routing.ErrNoKey, keyErr: &routing.KeyError{Err: routing.ErrNoKey}},
		{name: "non-numeric/header", req: &routing.Request{Method: "GET", Header: header("X-Cellmesh-Uid", "alice")},
			sentinel: routing.ErrNonNumericKey, keyErr: &routing.KeyError{Source: srcHeader, Key: "alice", Err: routing.ErrNonNumericKey}},
		{name: "non-numeric/cookie", req: &routing.Request{Method: "GET", Header: header("Cookie", "uid=bob")},
			sentinel: routing.ErrNonNumericKey, keyErr: &routing.KeyError{Source: srcCookie, Key: "bob", Err: routing.ErrNonNumericKey}},
		{name: "too-long", req: &routing.Request{Method: "GET", Header: header("X-Cellmesh-Uid", strings.Repeat("1", 257))},
			sentinel: routing.ErrKeyTooLong, keyErr: &routing.KeyError{Source: srcHeader, Key: strings.Repeat("1", 257), Err: routing.ErrKeyTooLong}},
		{name: "ambiguous/header", req: &routing.Request{Method: "GET", Header: header("X-Cellmesh-Uid", "1", "X-Cellmesh-Uid", "2")},
			sentinel: routing.ErrAmbiguousKey, keyErr: &routing.KeyError{Source: srcHeader, Err: routing.ErrAmbiguousKey}},
		{name: "ambiguous/cookie", req: &routing.Request{Method: "GET", Header: header("Cookie", "uid=1", "Cookie", "uid=2")},
			sentinel: routing.ErrAmbiguousKey, keyErr: &routing.KeyError{Source: srcCookie, Err: routing.ErrAmbiguousKey}},
		{name: "czone/no-local-unit", req: &routing.Request{Method: "GET", Path: "/v1/config/x"}, sentinel: routing.ErrNoLocalUnit},
		{name: "czone/unknown-local-unit", req: &routing.Request{Method: "GET", Path: "/v1/config/x", LocalUnit: "mars-1"}, sentinel: routing.ErrNoLocalUnit},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Decide(tc.req)
			if err == nil {
				t.Fatal("Decide succeeded, want an error")
			}
			if tc.sentinel != nil && !errors.Is(err, tc.sentinel) {
				t.Errorf("Decide error = %v, want errors.Is %v", err, tc.sentinel)
			}
			var ke *routing.KeyError
			if got := errors.As(err, &ke); got != (tc.keyErr != nil) {
				t.Fatalf("errors.As(*KeyError) = %v for %v", got, err)
			}
			if ke == nil {
				return
			}
			if diff := cmp.Diff(*tc.keyErr, *ke, cmp.Comparer(func(a, b error) bool { return errors.Is(a, b) || errors.Is(b, a) })); diff != "" {
				t.Errorf("KeyError (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDecideBadQueryIsKeyError(t *testing.T) {
	tp := validTopology()
	tp.Keys = []routing.KeySource{srcQuery}
	m := mustCompile(t, tp)
	_, err := m.Decide(&routing.Request{Method: "GET", RawQuery: "uid=%G1"})
	var ke *routing.KeyError
	if !errors.As(err, &ke) {
		t.Fatalf("Decide error = %v, want a *KeyError", err)
	}
	if ke.Source != srcQuery {
		t.Errorf("KeyError.Source = %v, want %v", ke.Source, srcQuery)
	}
	for _, s := range []error{routing.ErrNoKey, routing.ErrNonNumericKey, routing.ErrKeyTooLong, routing.ErrAmbiguousKey} {
		if errors.Is(err, s) {
			t.Errorf("a decoding error is not %v", s)
		}
	}
}

func TestKeyErrorMessage(t *testing.T) {
	long := strings.Repeat("x", 100)
	tests := []struct {
		err  *routing.KeyError
		want string
	}{
		{&routing.KeyError{Err: routing.ErrNoKey}, "no user key in the request"},
		{&routing.KeyError{Source: srcHeader, Key: "alice", Err: routing.ErrNonNumericKey},
			`user key "alice" from header x-cellmesh-uid: user key is not a decimal number`},
		{&routing.KeyError{Source: srcHeader, Key: long, Err: routing.ErrKeyTooLong},
			`user key "` + long[:64] + `..." from header x-cellmesh-uid: user key too long`},
		{&routing.KeyError{Source: srcCookie, Err: routing.ErrAmbiguousKey},
			"user key from cookie uid: user key given more than once with different values"},
	}
	for _, tc := range tests {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("Error() = %q, want %q", got, tc.want)
		}
	}
}

// A gzone route in a topology without a gzone writer is an
// *UnknownShardError for the global shard.
func TestDecideGZoneWithoutWriter(t *testing.T) {
	tp := validTopology()
	removeUnits(tp, "east-g", "west-g", "east-c")
	removeAssignments(tp, routing.GlobalShard)
	// A zone rule that routes to a writer the topology lacks is invalid...
	if err := tp.Validate(); err == nil || !strings.Contains(err.Error(), "routes to gzone but the topology has no global assignment") {
		t.Fatalf("Validate = %v, want the gzone rule refused", err)
	}
	// ...and without it, a czone route without czone units stays on the local unit.
	removeGZoneRules(tp)
	m := mustCompile(t, tp)
	d, err := m.Decide(&routing.Request{Method: "GET", Path: "/v1/config/x", LocalUnit: "east-1"})
	if err != nil || d.Unit != "east-1" || d.Zone != routing.KindCZone {
		t.Errorf("czone Decide = %+v, %v; want the local unit east-1", d, err)
	}
}

// A request without a key on an rzone route goes to the local unit when the
// deciding sidecar's unit is known (DESIGN: "no key -> the local unit"), and
// is an ErrNoKey otherwise.
func TestDecideNoKeyFallsBackToLocalUnit(t *testing.T) {
	m := mustCompile(t, validTopology())
	d, err := m.Decide(&routing.Request{Method: "POST", Path: "/v1/orders", LocalUnit: "west-1"})
	if err != nil || !d.LocalFallback || d.Unit != "west-1" || d.Region != "west" || d.Shard != routing.GlobalShard || d.Epoch != 0 || !d.Write {
		t.Fatalf("Decide = %+v, %v; want the local unit west-1 as a fallback", d, err)
	}
	if _, err := m.Decide(&routing.Request{Method: "POST", Path: "/v1/orders", LocalUnit: "nowhere"}); !errors.Is(err, routing.ErrNoKey) {
		t.Fatalf("unknown local unit: err = %v, want ErrNoKey", err)
	}
}

func TestLookup(t *testing.T) {
	m := mustCompile(t, validTopology())
	tests := []struct {
		shard int
		want  routing.Owner
	}{
		{0, routing.Owner{Shard: 0, Unit: "east-1", Region: "east", Epoch: 1, State: routing.StateServing, Standbys: []string{"west-1"}}},
		{2, routing.Owner{Shard: 2, Unit: "west-1", Region: "west", Epoch: 3, State: routing.StateServing, Standbys: []string{"east-1"}}},
		{3, routing.Owner{Shard: 3, Unit: "west-1", Region: "west", Epoch: 1, State: routing.StateDraining, Standbys: []string{"east-1"}}},
		{routing.GlobalShard, routing.Owner{Shard: routing.GlobalShard, Unit: "east-g", Region: "east", Epoch: 2, State: routing.StateServing, Standbys: []string{"west-g"}}},
	}
	for _, tc := range tests {
		t.Run(routing.ShardName(tc.shard), func(t *testing.T) {
			got, err := m.Lookup(tc.shard)
			if err != nil {
				t.Fatalf("Lookup: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("Lookup (-want +got):\n%s", diff)
			}
		})
	}

	for _, shard := range []int{4, 100, -2, -100} {
		_, err := m.Lookup(shard)
		var ue *routing.UnknownShardError
		if !errors.As(err, &ue) {
			t.Fatalf("Lookup(%d) error = %v, want *UnknownShardError", shard, err)
		}
		if ue.Shard != shard || ue.N != 4 {
			t.Errorf("Lookup(%d): UnknownShardError = %+v", shard, ue)
		}
		if want := fmt.Sprintf("unknown shard %d: shards are 0..3", shard); err.Error() != want {
			t.Errorf("Error() = %q, want %q", err, want)
		}
	}
}

func TestLookupGlobalWithoutWriter(t *testing.T) {
	tp := validTopology()
	removeUnits(tp, "east-g", "west-g", "east-c")
	removeAssignments(tp, routing.GlobalShard)
	removeGZoneRules(tp)
	m := mustCompile(t, tp)
	_, err := m.Lookup(routing.GlobalShard)
	var ue *routing.UnknownShardError
	if !errors.As(err, &ue) || ue.Shard != routing.GlobalShard {
		t.Fatalf("Lookup(global) error = %v, want *UnknownShardError", err)
	}
	if want := "no global assignment: the topology has no gzone writer"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err, want)
	}
}

// Lookup hands out its own copy of the standbys.
func TestLookupStandbysAreCopies(t *testing.T) {
	m := mustCompile(t, validTopology())
	o, _ := m.Lookup(0)
	o.Standbys[0] = "changed"
	if o2, _ := m.Lookup(0); o2.Standbys[0] != "west-1" {
		t.Errorf("changing a Lookup result changed the map: standbys %v", o2.Standbys)
	}
}

func TestShardMapAccessors(t *testing.T) {
	tp := validTopology()
	tp.Version = 7
	m := mustCompile(t, tp)
	if m.Version() != 7 {
		t.Errorf("Version() = %d, want 7", m.Version())
	}
	if m.Shards() != 4 {
		t.Errorf("Shards() = %d, want 4", m.Shards())
	}
	if u, ok := m.Unit("west-g"); !ok || u != (routing.Unit{Name: "west-g", Region: "west", Kind: routing.KindGZone, CapacityRPS: 500}) {
		t.Errorf("Unit(west-g) = %+v, %v", u, ok)
	}
	if _, ok := m.Unit("nope"); ok {
		t.Error("Unit(nope) found a unit")
	}
	if diff := cmp.Diff(tp, m.Topology()); diff != "" {
		t.Errorf("Topology() (-compiled +returned):\n%s", diff)
	}

	tp.Shards = 0
	reshardDefault(tp)
	if m := mustCompile(t, tp); m.Shards() != routing.DefaultShards {
		t.Errorf("Shards() = %d, want the default %d", m.Shards(), routing.DefaultShards)
	}
}

// reshardDefault assigns DefaultShards shards, for a topology with Shards 0.
func reshardDefault(t *routing.Topology) {
	reshard(t, routing.DefaultShards)
	t.Shards = 0
}

// Compile keeps its own copy: changing the topology afterwards, down to
// nested slices, changes nothing in the map.
func TestCompileCopiesTopology(t *testing.T) {
	tp := validTopology()
	tp.Rule = routing.ShardRule{Kind: routing.RuleMod}
	want := tp.Clone()
	m := mustCompile(t, tp)

	req := func() *routing.Request {
		return &routing.Request{Method: "GET", Path: "/v1/orders", Header: header("X-Cellmesh-Uid", "4", "Cookie", "uid=6"), LocalUnit: "east-1"}
	}
	before, err := m.Decide(req())
	if err != nil {
		t.Fatal(err)
	}
	czBefore, _ := m.Decide(&routing.Request{Method: "GET", Path: "/v1/config/x", LocalUnit: "east-1"})

	tp.Version = 99
	tp.Shards = 2
	tp.Rule.Kind = routing.RuleHash
	tp.Keys[0].Name = "x-other"
	tp.Keys[1].Kind = routing.KeyQuery
	tp.Zones.Rules[0].Methods[0] = "POST"
	tp.Zones.Rules[0].PathPrefix = "/v1/orders"
	tp.Zones.Default = routing.KindGZone
	tp.Units[0].Region = "west"
	tp.Units[4].Region = "west"
	tp.Units[0].Name = "renamed"
	tp.Assignments[0].Primary = "west-1"
	tp.Assignments[0].Standbys[0] = "east-1"
	tp.Assignments[0].Epoch = 42
	tp.Regions[0].Name = "renamed"

	after, err := m.Decide(req())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("Decide changed after the topology was modified (-before +after):\n%s", diff)
	}
	if czAfter, _ := m.Decide(&routing.Request{Method: "GET", Path: "/v1/config/x", LocalUnit: "east-1"}); czAfter != czBefore {
		t.Errorf("czone Decide changed: %+v -> %+v", czBefore, czAfter)
	}
	if o, _ := m.Lookup(0); o.Unit != "east-1" || o.Epoch != 1 || o.Standbys[0] != "west-1" {
		t.Errorf("Lookup(0) = %+v after the topology was modified", o)
	}
	if m.Version() != 1 || m.Shards() != 4 {
		t.Errorf("Version, Shards = %d, %d; want 1, 4", m.Version(), m.Shards())
	}
	if diff := cmp.Diff(want, m.Topology()); diff != "" {
		t.Errorf("Topology() changed (-want +got):\n%s", diff)
	}

	// The topology the map returns is a copy too.
	got := m.Topology()
	got.Assignments[0].Standbys[0] = "x"
	got.Zones.Rules[0].Methods[0] = "x"
	got.Keys[0].Name = "x"
	got.Units[0].Name = "x"
	if diff := cmp.Diff(want, m.Topology()); diff != "" {
		t.Errorf("changing Topology()'s result changed the map (-want +got):\n%s", diff)
	}
}

func TestCompileCopiesDigits(t *testing.T) {
	tp := validTopology()
	tp.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{2, 1}}
	m := mustCompile(t, tp)
	before, _ := m.ShardOf("1234")
	tp.Rule.Digits[0], tp.Rule.Digits[1] = 4, 3
	if after, _ := m.ShardOf("1234"); after != before {
		t.Errorf("ShardOf changed from %d to %d after the topology's digits changed", before, after)
	}
}

func TestClone(t *testing.T) {
	yes := true
	tp := validTopology()
	tp.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{2, 1}}
	tp.Zones.Rules[0].Write = &yes
	c := tp.Clone()
	if diff := cmp.Diff(tp, c); diff != "" {
		t.Fatalf("Clone differs (-orig +clone):\n%s", diff)
	}
	c.Rule.Digits[0] = 9
	c.Keys[0].Name = "x"
	c.Zones.Rules[0].Methods[0] = "x"
	c.Regions[0].Name = "x"
	c.Units[0].Name = "x"
	c.Assignments[0].Standbys[0] = "x"
	if diff := cmp.Diff(validTopologyWithDigitsAndWrite(), tp); diff != "" {
		t.Errorf("changing the clone changed the original (-want +got):\n%s", diff)
	}
}

func validTopologyWithDigitsAndWrite() *routing.Topology {
	yes := true
	tp := validTopology()
	tp.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{2, 1}}
	tp.Zones.Rules[0].Write = &yes
	return tp
}

func TestLiveStore(t *testing.T) {
	var live routing.Live
	if live.Load() != nil {
		t.Fatal("zero Live holds a map")
	}
	mapAt := func(v uint64) *routing.ShardMap {
		tp := validTopology()
		tp.Version = v
		return mustCompile(t, tp)
	}
	m1, m2, m2b, m3 := mapAt(1), mapAt(2), mapAt(2), mapAt(3)

	if err := live.Store(m2); err != nil {
		t.Fatalf("Store(v2): %v", err)
	}
	if live.Load() != m2 {
		t.Fatal("Load did not return the stored map")
	}
	err := live.Store(m1)
	var se *routing.StaleVersionError
	if !errors.As(err, &se) {
		t.Fatalf("Store(v1) after v2 = %v, want *StaleVersionError", err)
	}
	if se.Have != 2 || se.Got != 1 {
		t.Errorf("StaleVersionError = %+v, want Have 2, Got 1", se)
	}
	if want := "shard map version 1 is older than the current version 2"; err.Error() != want {
		t.Errorf("Error() = %q, want %q", err, want)
	}
	if live.Load() != m2 {
		t.Error("a refused Store replaced the map")
	}
	if err := live.Store(m2b); err != nil {
		t.Fatalf("Store of the same version: %v", err)
	}
	if live.Load() != m2b {
		t.Error("the same version did not replace the map")
	}
	if err := live.Store(m3); err != nil || live.Load() != m3 {
		t.Fatalf("Store(v3) = %v; Load = v%d", err, live.Load().Version())
	}
}

// versionedMaps compiles maps with versions 1..n. In version v, shard 0
// has epoch v and, for odd v, lives in west-1 instead of east-1, so a
// reader can check that each decision comes whole from one map.
func versionedMaps(tb testing.TB, n int) []*routing.ShardMap {
	ms := make([]*routing.ShardMap, n)
	for i := range ms {
		v := uint64(i + 1)
		tp := validTopology()
		tp.Version = v
		a := assignment(tp, 0)
		a.Epoch = v
		if v%2 == 1 {
			a.Primary, a.Standbys = "west-1", []string{"east-1"}
		}
		ms[i] = mustCompile(tb, tp)
	}
	return ms
}

// TestLiveConcurrent runs readers (Load + Decide) against writers storing
// new versions; run it under -race. Readers must see versions only move
// forward and every decision consistent with the map it came from; at the
// end the newest version is held whatever order the writers raced in.
func TestLiveConcurrent(t *testing.T) {
	const versions = 400
	const readers = 8
	const writers = 3
	maps := versionedMaps(t, versions)

	var live routing.Live
	if err := live.Store(maps[0]); err != nil {
		t.Fatal(err)
	}
	var done atomic.Bool
	var readersWG, writersWG sync.WaitGroup
	errs := make(chan error, readers+writers)

	for r := range readers {
		readersWG.Go(func() {
			req := &routing.Request{Method: "GET", Path: "/v1/orders", Header: header("X-Cellmesh-Uid", "4")}
			var last uint64
			for n := 0; ; n++ {
				finished := done.Load()
				m := live.Load()
				v := m.Version()
				if v < last {
					errs <- fmt.Errorf("reader %d: version went back from %d to %d", r, last, v)
					return
				}
				last = v
				d, err := m.Decide(req)
				if err != nil {
					errs <- fmt.Errorf("reader %d: Decide: %v", r, err)
					return
				}
				wantUnit := "east-1"
				if v%2 == 1 {
					wantUnit = "west-1"
				}
				if d.Shard != 0 || d.Epoch != v || d.Unit != wantUnit {
					errs <- fmt.Errorf("reader %d: map v%d decided %+v", r, v, d)
					return
				}
				// One more full pass after the writers finished, so every
				// reader sees the final map at least once.
				if finished && n > 0 {
					return
				}
			}
		})
	}
	for w := range writers {
		writersWG.Go(func() {
			// Writers store every version, each starting at a different
			// point, so they race and some stores are stale.
			for i := range versions {
				m := maps[(i+w*versions/writers)%versions]
				err := live.Store(m)
				var se *routing.StaleVersionError
				if err != nil && !errors.As(err, &se) {
					errs <- fmt.Errorf("writer %d: Store: %v", w, err)
					return
				}
				if se != nil && (se.Got != m.Version() || se.Have <= se.Got) {
					errs <- fmt.Errorf("writer %d: StaleVersionError %+v for v%d", w, se, m.Version())
					return
				}
			}
		})
	}
	writersWG.Wait()
	done.Store(true)
	readersWG.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := live.Load().Version(); got != versions {
		t.Errorf("after all stores the live map is v%d, want v%d", got, versions)
	}
}

// TestDecideDoesNotAllocate: the hot path makes no garbage for a header key,
// for every zone.
func TestDecideDoesNotAllocate(t *testing.T) {
	m := mustCompile(t, exampleTopology(t))
	reqs := map[string]*routing.Request{
		"rzone-header": {Method: "POST", Path: "/v1/transfers", Header: http.Header{"X-Cellmesh-Uid": {"2088123456789"}}, LocalUnit: "us-east-1"},
		"rzone-path":   {Method: "GET", Path: "/v1/users/2088123456789/orders", Header: http.Header{}, LocalUnit: "us-east-1"},
		"rzone-cookie": {Method: "GET", Path: "/", Header: http.Header{"Cookie": {"a=1; uid=2088123456789"}}, LocalUnit: "us-east-1"},
		"rzone-query":  {Method: "GET", Path: "/", RawQuery: "a=1&uid=2088123456789", Header: http.Header{}, LocalUnit: "us-east-1"},
		"gzone":        {Method: "PUT", Path: "/v1/config/fx", Header: http.Header{}, LocalUnit: "us-east-1"},
		"czone":        {Method: "GET", Path: "/v1/config/fx", Header: http.Header{}, LocalUnit: "eu-west-1"},
	}
	for name, req := range reqs {
		t.Run(name, func(t *testing.T) {
			if _, err := m.Decide(req); err != nil {
				t.Fatalf("Decide: %v", err)
			}
			allocs := testing.AllocsPerRun(200, func() {
				d, err := m.Decide(req)
				if err != nil || d.Unit == "" {
					panic(fmt.Sprint("Decide: ", d, err))
				}
			})
			if allocs != 0 {
				t.Errorf("Decide allocates %v times per call, want 0", allocs)
			}
		})
	}
}
