package routing_test

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/google/go-cmp/cmp"
)

// wantProblem is a problem Validate must report: Subject exactly, Message
// containing the substring.
type wantProblem struct {
	subject string
	message string
}

func removeUnits(t *routing.Topology, names ...string) {
	t.Units = slices.DeleteFunc(t.Units, func(u routing.Unit) bool { return slices.Contains(names, u.Name) })
}

func removeAssignments(t *routing.Topology, shards ...int) {
	t.Assignments = slices.DeleteFunc(t.Assignments, func(a routing.Assignment) bool { return slices.Contains(shards, a.Shard) })
}

// removeGZoneRules drops the zone rules that route to the gzone writer.
func removeGZoneRules(t *routing.Topology) {
	t.Zones.Rules = slices.DeleteFunc(t.Zones.Rules, func(r routing.ZoneRule) bool { return r.Zone == routing.KindGZone })
}

// renameUnit renames a unit everywhere it is named.
func renameUnit(t *routing.Topology, from, to string) {
	for i := range t.Units {
		if t.Units[i].Name == from {
			t.Units[i].Name = to
		}
	}
	for i := range t.Assignments {
		a := &t.Assignments[i]
		if a.Primary == from {
			a.Primary = to
		}
		for j := range a.Standbys {
			if a.Standbys[j] == from {
				a.Standbys[j] = to
			}
		}
	}
}

// renameRegion renames a region and the region of its units.
func renameRegion(t *routing.Topology, from, to string) {
	for i := range t.Regions {
		if t.Regions[i].Name == from {
			t.Regions[i].Name = to
		}
	}
	for i := range t.Units {
		if t.Units[i].Region == from {
			t.Units[i].Region = to
		}
	}
}

// reshard sets the shard count to n and spreads the shards over east-1 and
// west-1, each with the other as standby, keeping the global assignment.
func reshard(t *routing.Topology, n int) {
	removeAssignments(t, 0, 1, 2, 3)
	for s := range n {
		p, sb := "east-1", "west-1"
		if s%2 == 1 {
			p, sb = sb, p
		}
		t.Assignments = append(t.Assignments, routing.Assignment{Shard: s, Primary: p, Standbys: []string{sb}, Epoch: 1, State: routing.StateServing})
	}
	t.Shards = n
}

func TestValidTopology(t *testing.T) {
	if err := validTopology().Validate(); err != nil {
		t.Fatalf("validTopology: %v", err)
	}
}

func TestValidateExampleFile(t *testing.T) {
	if err := exampleTopology(t).Validate(); err != nil {
		t.Fatalf("%s: %v", exampleFile, err)
	}
}

func TestValidateDoesNotModify(t *testing.T) {
	for _, tp := range []*routing.Topology{validTopology(), {Version: 0, Shards: -3}} {
		before := tp.Clone()
		_ = tp.Validate()
		if diff := cmp.Diff(before, tp); diff != "" {
			t.Errorf("Validate changed the topology (-before +after):\n%s", diff)
		}
	}
}

func TestValidateProblems(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(t *routing.Topology)
		want   []wantProblem
		// others allows problems besides want (mutations with knock-on
		// effects); without it Validate must report exactly want.
		others bool
	}{
		// Topology-wide fields.
		{name: "shards/negative", mutate: func(t *routing.Topology) { t.Shards = -1 },
			want: []wantProblem{{"shards", "shard count -1 is out of range 1..65536"}}},
		{name: "shards/above-max", mutate: func(t *routing.Topology) { t.Shards = routing.MaxShards + 1 },
			want: []wantProblem{{"shards", "shard count 65537 is out of range"}}},
		{name: "version/zero", mutate: func(t *routing.Topology) { t.Version = 0 },
			want: []wantProblem{{"version", "version must be 1 or more"}}},

		// Regions.
		{name: "region/no-name", mutate: func(t *routing.Topology) { t.Regions = append(t.Regions, routing.Region{}) },
			want: []wantProblem{{"regions[2]", "region has no name"}}},
		{name: "region/invalid-name", mutate: func(t *routing.Topology) { renameRegion(t, "west", "West") },
			want: []wantProblem{{`region "West"`, "invalid name"}}},
		{name: "region/name-ends-with-dash", mutate: func(t *routing.Topology) { renameRegion(t, "west", "west-") },
			want: []wantProblem{{`region "west-"`, "invalid name"}}},
		{name: "region/name-starts-with-digit", mutate: func(t *routing.Topology) { renameRegion(t, "west", "1west") },
			want: []wantProblem{{`region "1west"`, "invalid name"}}},
		{name: "region/name-too-long", mutate: func(t *routing.Topology) { renameRegion(t, "west", "w"+strings.Repeat("x", 63)) },
			want: []wantProblem{{`region "w` + strings.Repeat("x", 63) + `"`, "invalid name"}}},
		{name: "region/declared-twice", mutate: func(t *routing.Topology) { t.Regions = append(t.Regions, routing.Region{Name: "east"}) },
			want: []wantProblem{{`region "east"`, "declared twice"}}},
		{name: "region/none", mutate: func(t *routing.Topology) { t.Regions = nil },
			want:   []wantProblem{{"regions", "no region declared"}, {`unit "east-1"`, `region "east" is not declared`}},
			others: true},
		{name: "region/no-unit", mutate: func(t *routing.Topology) { t.Regions = append(t.Regions, routing.Region{Name: "north"}) },
			want: []wantProblem{{`region "north"`, "has no unit"}}},

		// Units.
		{name: "unit/no-name", mutate: func(t *routing.Topology) {
			t.Units = append(t.Units, routing.Unit{Region: "east", Kind: routing.KindRZone, CapacityRPS: 1})
		}, want: []wantProblem{{"units[5]", "unit has no name"}}},
		{name: "unit/invalid-name", mutate: func(t *routing.Topology) { renameUnit(t, "east-1", "East_1") },
			want: []wantProblem{{`unit "East_1"`, "invalid name"}}},
		{name: "unit/declared-twice", mutate: func(t *routing.Topology) { t.Units = append(t.Units, t.Units[1]) },
			want: []wantProblem{{`unit "west-1"`, "declared twice"}}},
		{name: "unit/region-name", mutate: func(t *routing.Topology) {
			t.Units = append(t.Units, routing.Unit{Name: "east", Region: "east", Kind: routing.KindRZone, CapacityRPS: 1})
		}, want: []wantProblem{{`unit "east"`, "has the name of a region"}}},
		{name: "unit/no-region", mutate: func(t *routing.Topology) { unit(t, "east-c").Region = "" },
			want: []wantProblem{{`unit "east-c"`, "has no region"}}},
		{name: "unit/undeclared-region", mutate: func(t *routing.Topology) { unit(t, "east-c").Region = "south" },
			want: []wantProblem{{`unit "east-c"`, `region "south" is not declared`}}},
		{name: "unit/unknown-kind", mutate: func(t *routing.Topology) { unit(t, "east-c").Kind = "xzone" },
			want: []wantProblem{{`unit "east-c"`, `kind "xzone" is unknown`}}},
		{name: "unit/empty-kind", mutate: func(t *routing.Topology) { unit(t, "east-c").Kind = "" },
			want: []wantProblem{{`unit "east-c"`, `kind "" is unknown`}}},
		{name: "unit/capacity-zero", mutate: func(t *routing.Topology) { unit(t, "east-c").CapacityRPS = 0 },
			want: []wantProblem{{`unit "east-c"`, "capacity_rps 0 must be a positive request rate"}}},
		{name: "unit/capacity-negative", mutate: func(t *routing.Topology) { unit(t, "east-c").CapacityRPS = -5 },
			want: []wantProblem{{`unit "east-c"`, "capacity_rps -5 must be a positive"}}},
		{name: "unit/capacity-nan", mutate: func(t *routing.Topology) { unit(t, "east-c").CapacityRPS = math.NaN() },
			want: []wantProblem{{`unit "east-c"`, "capacity_rps NaN"}}},
		{name: "unit/capacity-inf", mutate: func(t *routing.Topology) { unit(t, "east-c").CapacityRPS = math.Inf(1) },
			want: []wantProblem{{`unit "east-c"`, "capacity_rps +Inf"}}},
		{name: "unit/capacity-huge", mutate: func(t *routing.Topology) { unit(t, "east-c").CapacityRPS = 2e12 },
			want: []wantProblem{{`unit "east-c"`, "capacity_rps 2e+12"}}},
		{name: "unit/no-rzone", mutate: func(t *routing.Topology) {
			for i := range t.Units {
				if t.Units[i].Kind == routing.KindRZone {
					t.Units[i].Kind = routing.KindCZone
				}
			}
		}, want: []wantProblem{{"units", "no rzone unit declared"}, {"shard 0", `primary "east-1" is a czone unit; this assignment needs a rzone unit`}},
			others: true},
		{name: "unit/czone-without-gzone", mutate: func(t *routing.Topology) {
			removeUnits(t, "east-g", "west-g")
			removeAssignments(t, routing.GlobalShard)
		}, want: []wantProblem{{`unit "east-c"`, "czone unit without a gzone unit"},
			{"zones.rules[1]", "routes to gzone but the topology has no global assignment"}}},

		// Shard coverage and the global assignment.
		{name: "shard/out-of-range", mutate: func(t *routing.Topology) {
			t.Assignments = append(t.Assignments, routing.Assignment{Shard: 4, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing})
		}, want: []wantProblem{{"shard 4", "out of range 0..3"}}},
		{name: "shard/negative", mutate: func(t *routing.Topology) {
			t.Assignments = append(t.Assignments, routing.Assignment{Shard: -2, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing})
		}, want: []wantProblem{{"shard -2", "out of range 0..3"}}},
		{name: "shard/assigned-twice", mutate: func(t *routing.Topology) {
			t.Assignments = append(t.Assignments, routing.Assignment{Shard: 2, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing})
		}, want: []wantProblem{{"shard 2", "assigned twice"}}},
		{name: "shard/unassigned", mutate: func(t *routing.Topology) { removeAssignments(t, 3) },
			want: []wantProblem{{"shard 3", "has no primary"}}},
		{name: "shard/default-count-unassigned", mutate: func(t *routing.Topology) { t.Shards = 0 },
			want: []wantProblem{{"shards 4-99", "have no primary"}}},
		{name: "shard/unassigned-runs", mutate: func(t *routing.Topology) { t.Shards = 9; removeAssignments(t, 1, 2) },
			want: []wantProblem{{"shards 1-2", "have no primary"}, {"shards 4-8", "have no primary"}}},
		{name: "global/twice", mutate: func(t *routing.Topology) {
			t.Assignments = append(t.Assignments, routing.Assignment{Shard: routing.GlobalShard, Primary: "west-g", Standbys: []string{"east-g"}, Epoch: 1, State: routing.StateServing})
		}, want: []wantProblem{{"global", "more than one gzone writer: the global assignment is declared 2 times"}}},
		{name: "global/three-times-reported-once", mutate: func(t *routing.Topology) {
			g := *assignment(t, routing.GlobalShard)
			t.Assignments = append(t.Assignments, g, g)
		}, want: []wantProblem{{"global", "declared 3 times"}}},
		{name: "global/without-gzone-units", mutate: func(t *routing.Topology) { removeUnits(t, "east-g", "west-g", "east-c") },
			want: []wantProblem{{"global", "a global assignment needs gzone units"}}},
		{name: "global/missing", mutate: func(t *routing.Topology) { removeAssignments(t, routing.GlobalShard) },
			want: []wantProblem{{"global", "gzone units are declared but no global assignment names the writer"},
				{"zones.rules[1]", "routes to gzone but the topology has no global assignment"}}},
		{name: "zones/default-gzone-without-writer", mutate: func(t *routing.Topology) {
			removeUnits(t, "east-g", "west-g", "east-c")
			removeAssignments(t, routing.GlobalShard)
			removeGZoneRules(t)
			t.Zones.Default = routing.KindGZone
		}, want: []wantProblem{{"zones", "default zone is gzone but the topology has no global assignment"}}},

		// One assignment.
		{name: "assignment/epoch-zero", mutate: func(t *routing.Topology) { assignment(t, 2).Epoch = 0 },
			want: []wantProblem{{"shard 2", "epoch must be 1 or more"}}},
		{name: "assignment/global-epoch-zero", mutate: func(t *routing.Topology) { assignment(t, routing.GlobalShard).Epoch = 0 },
			want: []wantProblem{{"global", "epoch must be 1 or more"}}},
		{name: "assignment/unknown-state", mutate: func(t *routing.Topology) { assignment(t, 1).State = "paused" },
			want: []wantProblem{{"shard 1", `state "paused" is unknown`}}},
		{name: "assignment/empty-state", mutate: func(t *routing.Topology) { assignment(t, 1).State = "" },
			want: []wantProblem{{"shard 1", `state "" is unknown`}}},
		{name: "assignment/no-primary", mutate: func(t *routing.Topology) { assignment(t, 0).Primary = "" },
			want: []wantProblem{{"shard 0", "has no primary"}}},
		{name: "assignment/undeclared-primary", mutate: func(t *routing.Topology) { assignment(t, 0).Primary = "nope" },
			want: []wantProblem{{"shard 0", `primary "nope" is not a declared unit`}}},
		{name: "assignment/primary-wrong-kind", mutate: func(t *routing.Topology) { assignment(t, 0).Primary = "east-g" },
			want: []wantProblem{{"shard 0", `primary "east-g" is a gzone unit; this assignment needs a rzone unit`}}},
		{name: "assignment/global-primary-wrong-kind", mutate: func(t *routing.Topology) {
			assignment(t, routing.GlobalShard).Primary = "east-1"
		}, want: []wantProblem{{"global", `primary "east-1" is a rzone unit; this assignment needs a gzone unit`}}},
		{name: "assignment/standby-is-primary", mutate: func(t *routing.Topology) {
			a := assignment(t, 0)
			a.Standbys = append(a.Standbys, "east-1")
		}, want: []wantProblem{{"shard 0", `standby "east-1" is also the primary`}}},
		{name: "assignment/standby-twice", mutate: func(t *routing.Topology) {
			a := assignment(t, 0)
			a.Standbys = append(a.Standbys, "west-1")
		}, want: []wantProblem{{"shard 0", `standby "west-1" is listed twice`}}},
		{name: "assignment/undeclared-standby", mutate: func(t *routing.Topology) {
			a := assignment(t, 0)
			a.Standbys = append(a.Standbys, "nope")
		}, want: []wantProblem{{"shard 0", `standby "nope" is not a declared unit`}}},
		{name: "assignment/standby-wrong-kind", mutate: func(t *routing.Topology) {
			a := assignment(t, 0)
			a.Standbys = append(a.Standbys, "east-c")
		}, want: []wantProblem{{"shard 0", `standby "east-c" is a czone unit; this assignment needs a rzone unit`}}},
		{name: "assignment/empty-standby", mutate: func(t *routing.Topology) {
			a := assignment(t, 0)
			a.Standbys = append(a.Standbys, "")
		}, want: []wantProblem{{"shard 0", "has no standby"}}},
		{name: "assignment/no-standby", mutate: func(t *routing.Topology) { assignment(t, 0).Standbys = nil },
			want: []wantProblem{{"shard 0", `no standby in another region than "east", though region "west" has rzone units`}}},
		{name: "assignment/standby-same-region", mutate: func(t *routing.Topology) {
			t.Units = append(t.Units, routing.Unit{Name: "east-2", Region: "east", Kind: routing.KindRZone, CapacityRPS: 1})
			assignment(t, 0).Standbys = []string{"east-2"}
		}, want: []wantProblem{{"shard 0", `no standby in another region than "east", though region "west" has rzone units`}}},
		{name: "assignment/global-no-cross-region-standby", mutate: func(t *routing.Topology) {
			assignment(t, routing.GlobalShard).Standbys = nil
		}, want: []wantProblem{{"global", `no standby in another region than "east", though region "west" has gzone units`}}},

		// Safety limits.
		{name: "safety/max-utilization-negative", mutate: func(t *routing.Topology) { t.Safety.MaxUtilization = -0.1 },
			want: []wantProblem{{"safety", "max_utilization -0.1 must be in (0, 1]"}}},
		{name: "safety/max-utilization-above-one", mutate: func(t *routing.Topology) { t.Safety.MaxUtilization = 1.5 },
			want: []wantProblem{{"safety", "max_utilization 1.5"}}},
		{name: "safety/max-utilization-nan", mutate: func(t *routing.Topology) { t.Safety.MaxUtilization = math.NaN() },
			want: []wantProblem{{"safety", "max_utilization NaN"}}},
		{name: "safety/min-serving-units-negative", mutate: func(t *routing.Topology) { t.Safety.MinServingUnits = -1 },
			want: []wantProblem{{"safety", "min_serving_units -1 must not be negative"}}},
		{name: "safety/max-shards-in-flight-negative", mutate: func(t *routing.Topology) { t.Safety.MaxShardsInFlight = -2 },
			want: []wantProblem{{"safety", "max_shards_in_flight -2 must not be negative"}}},

		// Shard rule (rule.go).
		{name: "rule/unknown-kind", mutate: func(t *routing.Topology) { t.Rule.Kind = "range" },
			want: []wantProblem{{"shard_rule", `rule "range" is unknown (want mod, digits or hash)`}}},
		{name: "rule/mod-with-digits", mutate: func(t *routing.Topology) { t.Rule.Digits = []int{1} },
			want: []wantProblem{{"shard_rule", `digits are only for the digits rule, not "mod"`}}},
		{name: "rule/hash-with-digits", mutate: func(t *routing.Topology) { t.Rule = routing.ShardRule{Kind: routing.RuleHash, Digits: []int{1}} },
			want: []wantProblem{{"shard_rule", `digits are only for the digits rule, not "hash"`}}},
		{name: "rule/digits-none", mutate: func(t *routing.Topology) { t.Rule = routing.ShardRule{Kind: routing.RuleDigits} },
			want: []wantProblem{{"shard_rule", "needs at least one digit position"}}},
		{name: "rule/digits-too-many", mutate: func(t *routing.Topology) {
			t.Rule = routing.ShardRule{Kind: routing.RuleDigits}
			for i := 1; i <= 20; i++ {
				t.Rule.Digits = append(t.Rule.Digits, i)
			}
		}, want: []wantProblem{{"shard_rule", "at most 19 digit positions, got 20"}}},
		{name: "rule/digit-position-zero", mutate: func(t *routing.Topology) { t.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{0}} },
			want: []wantProblem{{"shard_rule", "digit position 0 is out of range 1..40"}}},
		{name: "rule/digit-position-41", mutate: func(t *routing.Topology) { t.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{41}} },
			want: []wantProblem{{"shard_rule", "digit position 41 is out of range 1..40"}}},
		{name: "rule/digit-position-twice", mutate: func(t *routing.Topology) { t.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{2, 2}} },
			want: []wantProblem{{"shard_rule", "digit position 2 is listed twice"}}},
		{name: "rule/digits-too-few-values", mutate: func(t *routing.Topology) {
			reshard(t, 11)
			t.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{1}}
		}, want: []wantProblem{{"shard_rule", "1 digit(s) give only 10 values: shards 10..10 would never get a user"}}},

		// Key sources (key.go).
		{name: "key/unknown-kind", mutate: func(t *routing.Topology) { t.Keys[1].Kind = "body" },
			want: []wantProblem{{"key[1]", `key source "body" is unknown`}}},
		{name: "key/header-empty", mutate: func(t *routing.Topology) { t.Keys[0].Name = "" },
			want: []wantProblem{{"key[0]", `header name "" is not a valid HTTP header name`}}},
		{name: "key/header-space", mutate: func(t *routing.Topology) { t.Keys[0].Name = "x uid" },
			want: []wantProblem{{"key[0]", `header name "x uid" is not a valid HTTP header name`}}},
		{name: "key/header-colon", mutate: func(t *routing.Topology) { t.Keys[0].Name = "x-uid:" },
			want: []wantProblem{{"key[0]", "is not a valid HTTP header name"}}},
		{name: "key/header-too-long", mutate: func(t *routing.Topology) { t.Keys[0].Name = strings.Repeat("x", 257) },
			want: []wantProblem{{"key[0]", "is not a valid HTTP header name"}}},
		{name: "key/cookie-empty", mutate: func(t *routing.Topology) { t.Keys[1].Name = "" },
			want: []wantProblem{{"key[1]", `cookie name "" must be non-empty`}}},
		{name: "key/cookie-equals", mutate: func(t *routing.Topology) { t.Keys[1].Name = "a=b" },
			want: []wantProblem{{"key[1]", `cookie name "a=b" must be non-empty and contain none of`}}},
		{name: "key/cookie-semicolon", mutate: func(t *routing.Topology) { t.Keys[1].Name = "a;b" },
			want: []wantProblem{{"key[1]", `cookie name "a;b"`}}},
		{name: "key/query-ampersand", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyQuery, Name: "a&b"})
		}, want: []wantProblem{{"key[2]", `query name "a&b" must be non-empty`}}},
		{name: "key/query-space", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyQuery, Name: "a b"})
		}, want: []wantProblem{{"key[2]", `query name "a b"`}}},
		{name: "key/path-relative", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "v1/{key}"})
		}, want: []wantProblem{{"key[2]", `path pattern "v1/{key}" must start with '/'`}}},
		{name: "key/path-too-long", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/{key}" + strings.Repeat("/a", 600)})
		}, want: []wantProblem{{"key[2]", "path pattern is longer than 1024 bytes"}}},
		{name: "key/path-empty-segment", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/v1//{key}"})
		}, want: []wantProblem{{"key[2]", `path pattern "/v1//{key}" has an empty segment`}}},
		{name: "key/path-root", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/"})
		}, want: []wantProblem{{"key[2]", "has an empty segment"}}},
		{name: "key/path-bad-segment", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/v1/{id}"})
		}, want: []wantProblem{{"key[2]", `segment "{id}" must be a literal, '*' or '{key}'`}}},
		{name: "key/path-no-key", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/v1/users/*"})
		}, want: []wantProblem{{"key[2]", `path pattern "/v1/users/*" has no {key} segment`}}},
		{name: "key/path-key-twice", mutate: func(t *routing.Topology) {
			t.Keys = append(t.Keys, routing.KeySource{Kind: routing.KeyPath, Name: "/{key}/{key}"})
		}, want: []wantProblem{{"key[2]", "has {key} more than once"}}},

		// Zone rules (zone.go).
		{name: "zones/unknown-default", mutate: func(t *routing.Topology) { t.Zones.Default = "xzone" },
			want: []wantProblem{{"zones", `default zone "xzone" is unknown`}}},
		{name: "zones/rule-unknown-zone", mutate: func(t *routing.Topology) { t.Zones.Rules[1].Zone = "mzone" },
			want: []wantProblem{{"zones.rules[1]", `zone "mzone" is unknown`}}},
		{name: "zones/rule-empty-zone", mutate: func(t *routing.Topology) { t.Zones.Rules[0].Zone = "" },
			want: []wantProblem{{"zones.rules[0]", `zone "" is unknown`}}},
		{name: "zones/rule-prefix-and-path", mutate: func(t *routing.Topology) { t.Zones.Rules[1].Path = "/v1/config" },
			want: []wantProblem{{"zones.rules[1]", "give path_prefix or path, not both"}}},
		{name: "zones/rule-relative-prefix", mutate: func(t *routing.Topology) { t.Zones.Rules[1].PathPrefix = "v1/config/" },
			want: []wantProblem{{"zones.rules[1]", `path_prefix "v1/config/" must start with '/'`}}},
		{name: "zones/rule-path-with-key", mutate: func(t *routing.Topology) {
			t.Zones.Rules[1].PathPrefix = ""
			t.Zones.Rules[1].Path = "/v1/{key}"
		}, want: []wantProblem{{"zones.rules[1]", `segment "{key}" must be a literal, '*'`}}},
		{name: "zones/rule-path-relative", mutate: func(t *routing.Topology) {
			t.Zones.Rules[1].PathPrefix = ""
			t.Zones.Rules[1].Path = "v1"
		}, want: []wantProblem{{"zones.rules[1]", "must start with '/'"}}},
		{name: "zones/rule-bad-method", mutate: func(t *routing.Topology) { t.Zones.Rules[0].Methods = []string{"GET", "GE T"} },
			want: []wantProblem{{"zones.rules[0]", `method "GE T" is not a valid HTTP method`}}},
		{name: "zones/rule-empty-method", mutate: func(t *routing.Topology) { t.Zones.Rules[0].Methods = []string{""} },
			want: []wantProblem{{"zones.rules[0]", `method "" is not a valid HTTP method`}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp := validTopology()
			tc.mutate(tp)
			err := tp.Validate()
			var ve *routing.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Validate() = %v, want a *routing.ValidationError", err)
			}
			for _, w := range tc.want {
				if !hasProblem(ve.Problems, w) {
					t.Errorf("missing problem %s: ...%s...; got:\n%s", w.subject, w.message, ve.Error())
				}
			}
			if !tc.others && len(ve.Problems) != len(tc.want) {
				t.Errorf("got %d problems, want %d:\n%s", len(ve.Problems), len(tc.want), ve.Error())
			}
			// A topology that does not validate does not compile.
			if m, err := routing.Compile(tp); m != nil || !errors.As(err, &ve) {
				t.Errorf("Compile() = %v, %v; want nil, *ValidationError", m, err)
			}
		})
	}
}

// Safety.AllowNoCrossRegionStandby lifts the cross-region standby rule, and
// only that rule.
func TestValidateAllowNoCrossRegionStandby(t *testing.T) {
	tp := validTopology()
	tp.Safety.AllowNoCrossRegionStandby = true
	assignment(tp, 0).Standbys = nil
	assignment(tp, routing.GlobalShard).Standbys = nil
	if err := tp.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	assignment(tp, 1).Standbys = []string{"east-1"}
	err := tp.Validate()
	var ve *routing.ValidationError
	if !errors.As(err, &ve) || len(ve.Problems) != 1 || !hasProblem(ve.Problems, wantProblem{"shard 1", `standby "east-1" is also the primary`}) {
		t.Errorf("Validate() = %v, want only the standby-is-primary problem", err)
	}
}

func hasProblem(ps []routing.Problem, w wantProblem) bool {
	for _, p := range ps {
		if p.Subject == w.subject && strings.Contains(p.Message, w.message) {
			return true
		}
	}
	return false
}

// TestValidateReportsEveryProblem breaks one thing in each part of the
// topology at once; every one must be reported by the one call.
func TestValidateReportsEveryProblem(t *testing.T) {
	tp := validTopology()
	tp.Version = 0
	tp.Rule.Kind = "range"
	tp.Keys[0].Name = "x uid"
	tp.Zones.Default = "xzone"
	tp.Safety.MinServingUnits = -1
	tp.Regions = append(tp.Regions, routing.Region{Name: "north"})
	unit(tp, "east-c").CapacityRPS = 0
	assignment(tp, 2).Epoch = 0
	assignment(tp, 0).Standbys = nil
	removeAssignments(tp, 3)

	want := []routing.Problem{
		{Subject: "version", Message: "version must be 1 or more"},
		{Subject: "shard_rule", Message: `rule "range" is unknown (want mod, digits or hash)`},
		{Subject: "key[0]", Message: `header name "x uid" is not a valid HTTP header name`},
		{Subject: "zones", Message: `default zone "xzone" is unknown (want rzone, gzone or czone)`},
		{Subject: "safety", Message: "min_serving_units -1 must not be negative"},
		{Subject: `region "north"`, Message: "has no unit"},
		{Subject: `unit "east-c"`, Message: "capacity_rps 0 must be a positive request rate"},
		{Subject: "shard 0", Message: `no standby in another region than "east", though region "west" has rzone units`},
		{Subject: "shard 2", Message: "epoch must be 1 or more"},
		{Subject: "shard 3", Message: "has no primary"},
	}
	err := tp.Validate()
	var ve *routing.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("Validate() = %v, want a *routing.ValidationError", err)
	}
	sortProblems := func(ps []routing.Problem) {
		slices.SortFunc(ps, func(a, b routing.Problem) int { return strings.Compare(a.String(), b.String()) })
	}
	got := slices.Clone(ve.Problems)
	sortProblems(got)
	sortProblems(want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
	if msg := err.Error(); !strings.HasPrefix(msg, "invalid topology: 10 problems:\n  ") {
		t.Errorf("Error() = %q, want it to start with the count of problems", msg)
	}
	for _, p := range want {
		if !strings.Contains(err.Error(), "\n  "+p.Subject+": "+p.Message) {
			t.Errorf("Error() lacks the line for %s", p)
		}
	}
}

func TestValidationErrorOneProblem(t *testing.T) {
	tp := validTopology()
	tp.Version = 0
	err := tp.Validate()
	if got, want := err.Error(), "invalid topology: version: version must be 1 or more"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// Problems found in a topology that has no shard count to check against do
// not pile up: shard numbers and digit values are not checked.
func TestValidateBadShardCountSkipsShardChecks(t *testing.T) {
	tp := validTopology()
	tp.Shards = -4
	tp.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{1}}
	tp.Assignments = append(tp.Assignments, routing.Assignment{Shard: 99, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing})
	err := tp.Validate()
	var ve *routing.ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("Validate() = %v, want a *routing.ValidationError", err)
	}
	want := []routing.Problem{{Subject: "shards", Message: "shard count -4 is out of range 1..65536"}}
	if diff := cmp.Diff(want, ve.Problems); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
}

func TestValidName(t *testing.T) {
	tests := []struct {
		name string
		ok   bool
	}{
		{"a", true},
		{"us-east-1", true},
		{"a" + strings.Repeat("b", 62), true},
		{"a" + strings.Repeat("b", 63), false},
		{"", false},
		{"1a", false},
		{"-a", false},
		{"a-", false},
		{"A", false},
		{"a_b", false},
		{"a.b", false},
		{"a b", false},
		{"é", false},
	}
	for _, tc := range tests {
		if got := routing.ValidName(tc.name); got != tc.ok {
			t.Errorf("ValidName(%q) = %v, want %v", tc.name, got, tc.ok)
		}
	}
}

func TestShardName(t *testing.T) {
	for shard, want := range map[int]string{0: "shard 0", 7: "shard 7", routing.GlobalShard: "global", -2: "shard -2"} {
		if got := routing.ShardName(shard); got != want {
			t.Errorf("ShardName(%d) = %q, want %q", shard, got, want)
		}
	}
}
