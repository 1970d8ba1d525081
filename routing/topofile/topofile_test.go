package topofile_test

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	gocmp "github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var exampleFile = filepath.Join("..", "..", "examples", "topology", "three-regions.yaml")

// sameTopology compares topologies as the model means them: the order of
// assignments carries no meaning, and an empty list is no list.
var sameTopology = gocmp.Options{
	cmpopts.EquateEmpty(),
	cmpopts.SortSlices(func(a, b routing.Assignment) bool { return a.Shard < b.Shard }),
}

func readExample(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile(exampleFile)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// minimal is a small valid file; tests append to or edit it.
const minimal = `version: 3
shards: 4
regions:
  - name: east
  - name: west
units:
  - {name: east-1, region: east, kind: rzone, capacity_rps: 100}
  - {name: west-1, region: west, kind: rzone, capacity_rps: 100}
assignments:
  - {shards: 0-1, primary: east-1, standbys: [west-1]}
  - {shards: "2,3", primary: west-1, standbys: [east-1], epoch: 4, state: draining}
`

func TestParseExample(t *testing.T) {
	tp, err := topofile.Parse(readExample(t))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if err := tp.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	if tp.Version != 1 || tp.Shards != 100 || tp.Rule.Kind != routing.RuleMod {
		t.Errorf("version %d, shards %d, rule %q", tp.Version, tp.Shards, tp.Rule.Kind)
	}
	wantKeys := []routing.KeySource{
		{Kind: routing.KeyHeader, Name: "x-cellmesh-uid"},
		{Kind: routing.KeyCookie, Name: "uid"},
		{Kind: routing.KeyQuery, Name: "uid"},
		{Kind: routing.KeyPath, Name: "/v1/users/{key}"},
	}
	if diff := gocmp.Diff(wantKeys, tp.Keys); diff != "" {
		t.Errorf("keys (-want +got):\n%s", diff)
	}
	no := false
	wantZones := routing.ZoneRules{Default: routing.KindRZone, Rules: []routing.ZoneRule{
		{Methods: []string{"GET", "HEAD"}, PathPrefix: "/v1/config/", Zone: routing.KindCZone},
		{PathPrefix: "/v1/config/", Zone: routing.KindGZone},
		{Path: "/v1/fx/*/quote", Methods: []string{"POST"}, Zone: routing.KindCZone, Write: &no},
	}}
	if diff := gocmp.Diff(wantZones, tp.Zones); diff != "" {
		t.Errorf("zones (-want +got):\n%s", diff)
	}
	if want := (routing.Safety{MaxUtilization: 0.8, MinServingUnits: 2, MaxShardsInFlight: 10}); tp.Safety != want {
		t.Errorf("safety = %+v, want %+v", tp.Safety, want)
	}
	if len(tp.Regions) != 3 || len(tp.Units) != 11 || len(tp.Assignments) != 101 {
		t.Errorf("%d regions, %d units, %d assignments; want 3, 11, 101", len(tp.Regions), len(tp.Units), len(tp.Assignments))
	}
	if want := (routing.Unit{Name: "ap-south-2", Region: "ap-south", Kind: routing.KindRZone, CapacityRPS: 25000}); tp.Units[5] != want {
		t.Errorf("units[5] = %+v, want %+v", tp.Units[5], want)
	}
	byShard := map[int]routing.Assignment{}
	for _, a := range tp.Assignments {
		byShard[a.Shard] = a
	}
	for shard, want := range map[int]routing.Assignment{
		0:                   {Shard: 0, Primary: "us-east-1", Standbys: []string{"eu-west-1", "ap-south-1"}, Epoch: 1, State: routing.StateServing},
		16:                  {Shard: 16, Primary: "us-east-1", Standbys: []string{"eu-west-1", "ap-south-1"}, Epoch: 1, State: routing.StateServing},
		17:                  {Shard: 17, Primary: "us-east-2", Standbys: []string{"ap-south-2", "eu-west-2"}, Epoch: 1, State: routing.StateServing},
		89:                  {Shard: 89, Primary: "ap-south-2", Standbys: []string{"eu-west-2", "us-east-2"}, Epoch: 1, State: routing.StateServing},
		routing.GlobalShard: {Shard: routing.GlobalShard, Primary: "us-east-g", Standbys: []string{"eu-west-g"}, Epoch: 1, State: routing.StateServing},
	} {
		if diff := gocmp.Diff(want, byShard[shard]); diff != "" {
			t.Errorf("%s (-want +got):\n%s", routing.ShardName(shard), diff)
		}
	}
}

func TestLoad(t *testing.T) {
	tp, err := topofile.Load(exampleFile)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	parsed, _ := topofile.Parse(readExample(t))
	if diff := gocmp.Diff(parsed, tp); diff != "" {
		t.Errorf("Load and Parse differ (-parse +load):\n%s", diff)
	}

	missing := filepath.Join(t.TempDir(), "missing.yaml")
	if _, err := topofile.Load(missing); err == nil || !strings.Contains(err.Error(), "missing.yaml") {
		t.Errorf("Load(missing) = %v, want an error naming the file", err)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	if err := os.WriteFile(bad, []byte("version: 1\nbogus: 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := topofile.Load(bad); err == nil || !strings.Contains(err.Error(), "bad.yaml") || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("Load(bad) = %v, want an error naming the file and line 2", err)
	}
}

func TestParseDefaults(t *testing.T) {
	tp, err := topofile.Parse([]byte(minimal))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if err := tp.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	want := &routing.Topology{
		Version: 3,
		Shards:  4,
		Regions: []routing.Region{{Name: "east"}, {Name: "west"}},
		Units: []routing.Unit{
			{Name: "east-1", Region: "east", Kind: routing.KindRZone, CapacityRPS: 100},
			{Name: "west-1", Region: "west", Kind: routing.KindRZone, CapacityRPS: 100},
		},
		Assignments: []routing.Assignment{
			// epoch defaults to 1 and state to serving ...
			{Shard: 0, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing},
			{Shard: 1, Primary: "east-1", Standbys: []string{"west-1"}, Epoch: 1, State: routing.StateServing},
			// ... and given ones are kept.
			{Shard: 2, Primary: "west-1", Standbys: []string{"east-1"}, Epoch: 4, State: routing.StateDraining},
			{Shard: 3, Primary: "west-1", Standbys: []string{"east-1"}, Epoch: 4, State: routing.StateDraining},
		},
	}
	if diff := gocmp.Diff(want, tp, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("Parse (-want +got):\n%s", diff)
	}
	// Each expanded assignment has its own standby list.
	tp.Assignments[0].Standbys[0] = "changed"
	if tp.Assignments[1].Standbys[0] != "west-1" {
		t.Error("assignments expanded from one entry share their standbys")
	}
}

func TestParseShardSets(t *testing.T) {
	tests := []struct {
		name string
		set  string // the YAML value of shards:
		want []int
	}{
		{"single", "7", []int{7}},
		{"zero", "0", []int{0}},
		{"range", "0-3", []int{0, 1, 2, 3}},
		{"one-element-range", "5-5", []int{5}},
		{"global", "global", []int{routing.GlobalShard}},
		{"comma-list", `"0-1,5,global"`, []int{0, 1, 5, routing.GlobalShard}},
		{"spaces", `" 1 - 2 , 4 "`, []int{1, 2, 4}},
		{"yaml-list", "[0, 2-3, global]", []int{0, 2, 3, routing.GlobalShard}},
		{"yaml-list-with-commas", `["0,1", 3]`, []int{0, 1, 3}},
		{"block-list", "\n      - 1\n      - 2-3", []int{1, 2, 3}},
		{"largest", "65535", []int{routing.MaxShards - 1}},
		{"leading-zero", "007", []int{7}},
		{"duplicates-kept-for-validate", "[1, 1]", []int{1, 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp, err := topofile.Parse([]byte("version: 1\nassignments:\n  - primary: a\n    shards: " + tc.set + "\n"))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			var got []int
			for _, a := range tp.Assignments {
				got = append(got, a.Shard)
			}
			if diff := gocmp.Diff(tc.want, got); diff != "" {
				t.Errorf("shards (-want +got):\n%s", diff)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		file string
		want []string // substrings of the error, in order of appearance or not
	}{
		{"empty", "", []string{"empty topology"}},
		{"blank", " \n\t\n", []string{"empty topology"}},
		{"comment-only", "# nothing here\n", []string{"empty topology"}},
		{"null-document", "---\n~\n", []string{"empty topology"}},
		{"tab-indent", "version: 1\nregions:\n\t- name: east\n", []string{"tabs", "indent with spaces"}},
		{"not-a-mapping", "- 1\n- 2\n", []string{"line 1", "cannot unmarshal"}},
		{"unknown-key", "version: 1\nshards: 4\nregion:\n  - name: east\n", []string{"line 3: unknown key region at the top level"}},
		{"unknown-nested-key", "version: 1\nunits:\n  - name: a\n    capacity: 5\n", []string{"line 4: unknown key capacity in a unit"}},
		{"unknown-zone-key", "version: 1\nzones:\n  rules:\n    - {zone: czone, prefix: /x}\n", []string{"line 4: unknown key prefix in a zone rule"}},
		{"unknown-safety-key", "version: 1\nsafety:\n  max_util: 0.5\n", []string{"line 3: unknown key max_util in safety"}},
		{"unknown-key-in-key-source", "version: 1\nkey:\n  - header: x-uid\n    cookei: uid\n", []string{"line 4", "cookei"}},
		{"wrong-type/shards", "version: 1\nshards: many\n", []string{`line 2: shards: want a whole number, got "many"`}},
		{"wrong-type/version-negative", "version: -1\n", []string{"line 1: version: want a whole number from 0 to"}},
		{"wrong-type/regions-mapping", "version: 1\nregions: {name: east}\n", []string{"line 2", "cannot unmarshal"}},
		{"wrong-type/capacity", "version: 1\nunits:\n  - {name: a, capacity_rps: lots}\n", []string{"line 3", "cannot unmarshal"}},
		{"wrong-type/digits", "version: 1\nshard_rule: {kind: digits, digits: three}\n", []string{"line 2", "cannot unmarshal"}},
		{"wrong-type/write", "version: 1\nzones:\n  rules:\n    - {zone: czone, write: maybe}\n", []string{"line 4", "cannot unmarshal"}},
		{"wrong-type/key-entry-scalar", "version: 1\nkey:\n  - x-cellmesh-uid\n", []string{"line 3", "cannot unmarshal"}},
		{"two-documents", "version: 1\n---\nversion: 2\n", []string{"more than one document"}},
		{"two-documents-second-empty-mapping", "version: 1\n---\n{}\n", []string{"more than one document"}},
		{"bad-yaml", "version: [1\n", []string{"decode YAML", "line"}},
		{"duplicate-key", "version: 1\nversion: 2\n", []string{"line 2", "already defined"}},
		{"tab-indent", "version: 1\nregions:\n\t- name: a\n", []string{"decode YAML"}},

		{"shards/reversed-range", "version: 1\nassignments:\n  - {shards: 5-2, primary: a}\n", []string{"line 3", `range "5-2" ends before it starts`}},
		{"shards/word", "version: 1\nassignments:\n  - {shards: x, primary: a}\n", []string{"line 3", `"x" is not a shard number`}},
		{"shards/too-big", "version: 1\nassignments:\n  - {shards: 70000, primary: a}\n", []string{"line 3", "shard 70000 is beyond the largest possible shard 65535"}},
		{"shards/max-shards", "version: 1\nassignments:\n  - {shards: 65536, primary: a}\n", []string{"beyond the largest possible shard"}},
		{"shards/range-too-big", "version: 1\nassignments:\n  - {shards: 0-70000, primary: a}\n", []string{"line 3", "beyond"}},
		{"shards/negative", "version: 1\nassignments:\n  - {shards: -1, primary: a}\n", []string{"line 3", "not a shard number"}},
		{"shards/open-range", "version: 1\nassignments:\n  - {shards: 3-, primary: a}\n", []string{"line 3", "not a shard number"}},
		{"shards/two-dashes", "version: 1\nassignments:\n  - {shards: 1-2-3, primary: a}\n", []string{"line 3", "not a shard number"}},
		{"shards/empty-list-item", "version: 1\nassignments:\n  - {shards: \"1,,2\", primary: a}\n", []string{"line 3", "not a shard number"}},
		{"shards/float", "version: 1\nassignments:\n  - {shards: 1.5, primary: a}\n", []string{"line 3", "not a shard number"}},
		{"shards/bad-in-list", "version: 1\nassignments:\n  - {shards: [1, 9-3], primary: a}\n", []string{"line 3", "ends before it starts"}},
		{"shards/nested-list", "version: 1\nassignments:\n  - shards: [1, [2]]\n    primary: a\n", []string{"line 3", "want a shard"}},
		{"shards/mapping", "version: 1\nassignments:\n  - shards: {a: 1}\n    primary: a\n", []string{"line 3", "want a shard"}},
		{"shards/missing", "version: 1\nassignments:\n  - {primary: a}\n", []string{"assignments[0]", `(primary "a")`, "no shards listed"}},
		{"shards/empty-list", "version: 1\nassignments:\n  - {shards: [], primary: a}\n", []string{"assignments[0]", "no shards listed"}},
		{"shards/too-many-in-one-set", "version: 1\nassignments:\n  - {shards: [0-65535, 0-65535, 0-1], primary: a}\n", []string{"line 3", "more than 131072 shards"}},

		{"shards/too-many-in-all", "version: 1\nassignments:\n  - {shards: 0-65535, primary: a}\n  - {shards: 0-65535, primary: b}\n  - {shards: 0, primary: c}\n", []string{"assignments", "more than 131072 shards"}},

		{"key/two-fields", "version: 1\nkey:\n  - {header: x-uid, cookie: uid}\n", []string{"line 3", "key[0]", "give exactly one of header, cookie, query or path"}},
		{"key/no-field", "version: 1\nkey:\n  - header: x-uid\n  - {}\n", []string{"line 4", "key[1]", "give exactly one of"}},
		{"key/all-empty", "version: 1\nkey:\n  - {header: \"\"}\n", []string{"line 3", "key[0]", "give exactly one of"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp, err := topofile.Parse([]byte(tc.file))
			if err == nil {
				t.Fatalf("Parse succeeded: %+v", tp)
			}
			if tp != nil {
				t.Errorf("Parse returned a topology with its error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// Every shape error of a file is reported at once where the decoder can.
func TestParseReportsAllKeyAndAssignmentErrors(t *testing.T) {
	file := "version: 1\nkey:\n  - {header: a, query: b}\n  - {}\nassignments:\n  - {primary: x}\n"
	_, err := topofile.Parse([]byte(file))
	if err == nil {
		t.Fatal("Parse succeeded")
	}
	for _, w := range []string{"line 3: key[0]", "line 4: key[1]", "assignments[0]"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
}

func TestParseKeySources(t *testing.T) {
	file := "version: 1\nkey:\n  - header: X-User\n  - cookie: sid\n  - query: u\n  - path: /api/{key}\n"
	tp, err := topofile.Parse([]byte(file))
	if err != nil {
		t.Fatal(err)
	}
	want := []routing.KeySource{
		{Kind: routing.KeyHeader, Name: "X-User"},
		{Kind: routing.KeyCookie, Name: "sid"},
		{Kind: routing.KeyQuery, Name: "u"},
		{Kind: routing.KeyPath, Name: "/api/{key}"},
	}
	if diff := gocmp.Diff(want, tp.Keys); diff != "" {
		t.Errorf("keys (-want +got):\n%s", diff)
	}
}

// roundTrip encodes tp, parses the result and checks that it equals tp.
// It returns the encoded file.
func roundTrip(t *testing.T, tp *routing.Topology) []byte {
	t.Helper()
	enc, err := topofile.Encode(tp)
	if err != nil {
		t.Fatalf("Encode: %v", err)
	}
	back, err := topofile.Parse(enc)
	if err != nil {
		t.Fatalf("Parse(Encode(t)): %v\n%s", err, enc)
	}
	if diff := gocmp.Diff(tp, back, sameTopology); diff != "" {
		t.Errorf("Parse(Encode(t)) differs (-t +parsed):\n%s\nencoded:\n%s", diff, enc)
	}
	// Encoding is stable: the parsed topology encodes to the same bytes.
	again, err := topofile.Encode(back)
	if err != nil {
		t.Fatalf("Encode again: %v", err)
	}
	if string(again) != string(enc) {
		t.Errorf("Encode(Parse(Encode(t))) differs from Encode(t):\n%s\n---\n%s", enc, again)
	}
	return enc
}

func TestEncodeRoundTripExample(t *testing.T) {
	tp, err := topofile.Parse(readExample(t))
	if err != nil {
		t.Fatal(err)
	}
	enc := roundTrip(t, tp)
	// Runs of consecutive shards become one range: six rzone runs and the
	// global writer.
	f := topofile.FromTopology(tp)
	if len(f.Assignments) != 7 {
		t.Errorf("FromTopology gives %d assignment entries, want 7:\n%s", len(f.Assignments), enc)
	}
	for _, s := range []string{"0-16", "84-99", "global"} {
		if !regexp.MustCompile(`shards: "?` + s + `"?\n`).Match(enc) {
			t.Errorf("encoded file lacks shards: %s:\n%s", s, enc)
		}
	}
}

func TestEncodeRoundTrip(t *testing.T) {
	yes, no := true, false
	tests := []struct {
		name   string
		mutate func(tp *routing.Topology)
	}{
		{"minimal", func(tp *routing.Topology) {}},
		{"digits-rule", func(tp *routing.Topology) { tp.Rule = routing.ShardRule{Kind: routing.RuleDigits, Digits: []int{3, 2}} }},
		{"hash-rule", func(tp *routing.Topology) { tp.Rule = routing.ShardRule{Kind: routing.RuleHash} }},
		{"every-key-source", func(tp *routing.Topology) {
			tp.Keys = []routing.KeySource{
				{Kind: routing.KeyPath, Name: "/v1/*/{key}"},
				{Kind: routing.KeyQuery, Name: "user-id"},
				{Kind: routing.KeyCookie, Name: "sid"},
				{Kind: routing.KeyHeader, Name: "X-User"},
			}
		}},
		{"zone-rules", func(tp *routing.Topology) {
			tp.Zones = routing.ZoneRules{Default: routing.KindCZone, Rules: []routing.ZoneRule{
				{Methods: []string{"get", "POST"}, PathPrefix: "/a", Zone: routing.KindRZone, Write: &yes},
				{Path: "/b/*/c", Zone: routing.KindCZone, Write: &no},
				{Zone: routing.KindRZone},
			}}
		}},
		{"safety", func(tp *routing.Topology) {
			tp.Safety = routing.Safety{MaxUtilization: 0.125, MinServingUnits: 3, MaxShardsInFlight: 1, AllowNoCrossRegionStandby: true}
		}},
		{"epochs-and-states", func(tp *routing.Topology) {
			tp.Assignments[1].Epoch = 9
			tp.Assignments[2].State = routing.StateBlocked
			tp.Assignments[3].Standbys = nil
		}},
		{"unsorted-assignments", func(tp *routing.Topology) {
			slices.Reverse(tp.Assignments)
		}},
		{"non-consecutive-same-owner", func(tp *routing.Topology) {
			tp.Assignments[1].Primary, tp.Assignments[1].Standbys = "west-1", []string{"east-1"}
			tp.Assignments[2].Primary, tp.Assignments[2].Standbys = "east-1", []string{"west-1"}
		}},
		{"default-shard-count-and-big-numbers", func(tp *routing.Topology) {
			tp.Version = 1<<64 - 1
			tp.Units[0].CapacityRPS = 1e12
			tp.Units[1].CapacityRPS = 0.001
		}},
		{"names-that-look-like-other-types", func(tp *routing.Topology) {
			tp.Regions = append(tp.Regions, routing.Region{Name: "null"}, routing.Region{Name: "true"}, routing.Region{Name: "y"}, routing.Region{Name: "e1"})
			tp.Units = append(tp.Units,
				routing.Unit{Name: "yes", Region: "null", Kind: routing.KindRZone, CapacityRPS: 1},
				routing.Unit{Name: "no", Region: "true", Kind: routing.KindRZone, CapacityRPS: 1},
				routing.Unit{Name: "on", Region: "y", Kind: routing.KindRZone, CapacityRPS: 1},
				routing.Unit{Name: "e5", Region: "e1", Kind: routing.KindRZone, CapacityRPS: 1})
			tp.Keys = []routing.KeySource{{Kind: routing.KeyHeader, Name: "~"}, {Kind: routing.KeyCookie, Name: "1"}, {Kind: routing.KeyQuery, Name: "0x1F"}}
			tp.Zones.Rules = []routing.ZoneRule{{Methods: []string{"1", "~", "Y"}, PathPrefix: "/: #x", Zone: routing.KindGZone}}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tp, err := topofile.Parse([]byte(minimal))
			if err != nil {
				t.Fatal(err)
			}
			tc.mutate(tp)
			roundTrip(t, tp)
		})
	}
}

// FromTopology does not reorder or change the topology it is given.
func TestFromTopologyLeavesInputAlone(t *testing.T) {
	tp, err := topofile.Parse(readExample(t))
	if err != nil {
		t.Fatal(err)
	}
	slices.Reverse(tp.Assignments)
	before := tp.Clone()
	topofile.FromTopology(tp)
	if _, err := topofile.Encode(tp); err != nil {
		t.Fatal(err)
	}
	if diff := gocmp.Diff(before, tp); diff != "" {
		t.Errorf("FromTopology changed its input (-before +after):\n%s", diff)
	}
	if before.Assignments[0].Shard != routing.GlobalShard || before.Assignments[1].Shard != 99 {
		t.Fatal("test setup: assignments are not reversed")
	}
}

func TestShardSetMarshal(t *testing.T) {
	g := routing.GlobalShard
	tests := []struct {
		set  []topofile.ShardRange
		want string
	}{
		{[]topofile.ShardRange{{7, 7}}, "7"},
		{[]topofile.ShardRange{{0, 2}}, "0-2"},
		{[]topofile.ShardRange{{g, g}}, "global"},
		{[]topofile.ShardRange{{0, 3}, {9, 9}}, "0-3,9"},
		{[]topofile.ShardRange{{g, g}, {0, 1}}, "global,0-1"},
		{[]topofile.ShardRange{{5, 5}, {4, 4}}, "5,4"},
		{nil, ""},
	}
	for _, tc := range tests {
		got, err := topofile.ShardSet{Ranges: tc.set}.MarshalYAML()
		if err != nil || got != tc.want {
			t.Errorf("MarshalYAML(%v) = %v, %v; want %q", tc.set, got, err, tc.want)
		}
	}
}
