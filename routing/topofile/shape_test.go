package topofile_test

import (
	"errors"
	"fmt"
	"go/parser"
	"go/token"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	"go.yaml.in/yaml/v3"
)

// allocated returns the bytes f allocates on the heap.
func allocated(f func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	f()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// A small file may list far more shards than a topology can have, the more
// so with aliases. Parse must refuse it from the ranges' sizes, before
// expanding any of them.
func TestParseRefusesHugeShardLists(t *testing.T) {
	const entries = 4000
	oneByOne := func() string { // "0, 1, 2, ..., 65535"
		var b strings.Builder
		for i := range routing.MaxShards {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprint(&b, i)
		}
		return b.String()
	}()
	tests := []struct {
		name  string
		first string // the first entry of assignments
		rest  string // every other entry
		want  string
	}{
		{"range-per-entry", "{shards: 0-65535, primary: a-1}", "{shards: 0-65535, primary: a-1}", "more than 131072 shards"},
		{"aliased-range", "{shards: &s 0-65535, primary: a-1}", "{shards: *s, primary: a-1}", "more than 131072 shards"},
		{"aliased-list", "{shards: &s [" + oneByOne + "], primary: a-1}", "{shards: *s, primary: a-1}", "more than 131072 shards"},
		{"aliased-entry", "&a {shards: [" + oneByOne + "], primary: a-1}", "*a", "more than 131072 shards"},
		{"aliased-standbys", "&a {shards: 1, primary: a-1, standbys: [" + oneByOne + "]}", "*a", "excessive aliasing"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			b.WriteString("version: 1\nassignments:\n  - " + tc.first + "\n")
			for range entries - 1 {
				b.WriteString("  - " + tc.rest + "\n")
			}
			file := []byte(b.String())
			var err error
			n := allocated(func() { _, err = topofile.Parse(file) })
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse of a %d KiB file = %.300v; want an error saying %q", len(file)>>10, err, tc.want)
			}
			t.Logf("%d KiB file, %d MiB allocated", len(file)>>10, n>>20)
			if n > 200<<20 {
				t.Errorf("Parse of a %d KiB file allocated %d MiB; want at most 200", len(file)>>10, n>>20)
			}
		})
	}
}

// The limit counts what the file lists, across entries; one shard under it
// is fine.
func TestParseShardLimitIsOnTheTotal(t *testing.T) {
	file := "version: 1\nassignments:\n  - {shards: 0-65535, primary: a}\n  - {shards: [0-65534, global], primary: b}\n"
	tp, err := topofile.Parse([]byte(file))
	if err != nil {
		t.Fatalf("Parse of exactly %d shards: %v", 2*routing.MaxShards, err)
	}
	if len(tp.Assignments) != 2*routing.MaxShards {
		t.Errorf("%d assignments, want %d", len(tp.Assignments), 2*routing.MaxShards)
	}
	_, err = topofile.Parse([]byte(file + "  - {shards: 7, primary: c}\n"))
	if err == nil || !strings.Contains(err.Error(), "line 5: assignments[2]: the file lists more than 131072 shards") {
		t.Errorf("Parse of one shard more = %v", err)
	}
}

// File.Topology checks a File built in Go as it checks a parsed one, and a
// File decoded outside Parse encodes back.
func TestFileTopology(t *testing.T) {
	g := routing.GlobalShard
	f := &topofile.File{
		Version: 1,
		Key:     []topofile.KeyFile{{Header: "a"}, {}},
		Assignments: []topofile.AssignFile{
			{Shards: topofile.ShardSet{Ranges: []topofile.ShardRange{{0, 65535}, {g, g}}}, Primary: "a"},
			{Shards: topofile.ShardSet{Ranges: []topofile.ShardRange{{5, 2}, {-3, 1}, {0, 65536}}}, Primary: "b"},
			{Primary: "c"},
			{Shards: topofile.ShardSet{Ranges: []topofile.ShardRange{{0, 65535}}}, Primary: "d"},
		},
	}
	_, err := f.Topology()
	want := `key[1]: give exactly one of header, cookie, query or path
shards: range 5-2 ends before it starts
shards: range -3-1 is not within 0-65535
shards: range 0-65536 is not within 0-65535
assignments[2] (primary "c"): no shards listed
assignments[3]: the file lists more than 131072 shards in all, twice the most a topology can have`
	if err == nil || err.Error() != want {
		t.Errorf("Topology error:\n%v\nwant:\n%s", err, want)
	}

	f.Key, f.Assignments = f.Key[:1], f.Assignments[:1]
	tp, err := f.Topology()
	if err != nil {
		t.Fatal(err)
	}
	if len(tp.Assignments) != routing.MaxShards+1 || tp.Assignments[routing.MaxShards].Shard != g || tp.Assignments[0].Epoch != 1 {
		t.Errorf("%d assignments, the last %+v; want %d, the last global, epoch 1", len(tp.Assignments), tp.Assignments[len(tp.Assignments)-1], routing.MaxShards+1)
	}

	var decoded topofile.File
	if err := yaml.Unmarshal([]byte("assignments: [{shards: [\" 1-2 \", global], primary: a}]"), &decoded); err != nil {
		t.Fatal(err)
	}
	out, err := yaml.Marshal(decoded.Assignments)
	if want := "- shards: 1-2,global\n  primary: a\n"; err != nil || string(out) != want {
		t.Errorf("Marshal of a decoded set = %q, %v; want %q", out, err, want)
	}
}

// Every integer field refuses what is not a whole number instead of
// truncating it, and names its key and line.
func TestParseWholeNumbers(t *testing.T) {
	const tail = "regions: [{name: r}]\nunits: [{name: u, region: r, kind: rzone, capacity_rps: 1}]\n"
	tests := []struct {
		name string
		file string
		want string // the whole error
	}{
		{"shards", "version: 1\nshards: 65536.7\n", "line 2: shards: want a whole number, got 65536.7"},
		{"version", "version: 1.9\n", "line 1: version: want a whole number, got 1.9"},
		{"version-quoted", "version: \"1\"\n", `line 1: version: want a whole number, got "1"`},
		{"version-word", "version: 1\nshards: ten\n", `line 2: shards: want a whole number, got "ten"`},
		{"version-negative", "version: -1\n", "line 1: version: want a whole number from 0 to 18446744073709551615, got -1"},
		{"version-list", "version: [1]\n", "line 1: version: want a whole number, got a list"},
		{"version-bool", "version: true\n", "line 1: version: want a whole number, got true"},
		{"epoch", "version: 1\nassignments:\n  - shards: 1\n    primary: u\n    epoch: 3.9\n", "line 5: epoch: want a whole number, got 3.9"},
		{"max-shards-in-flight", "version: 1\nsafety:\n  max_shards_in_flight: 2.5\n", "line 3: max_shards_in_flight: want a whole number, got 2.5"},
		{"two-on-one-line", "version: 1\nsafety: {min_serving_units: 1.5, max_shards_in_flight: 1.5}\n",
			"line 2: min_serving_units: want a whole number, got 1.5\nline 2: max_shards_in_flight: want a whole number, got 1.5"},
		{"digits", "version: 1\nshard_rule: {kind: digits, digits: [2.5]}\n", "line 2: digits: want a whole number, got 2.5"},
		{"digits-block", "version: 1\nshard_rule:\n  kind: digits\n  digits:\n    - 1\n    - 2e0\n", "line 6: digits: want a whole number, got 2e0"},
		{"aliased", "version: &v 1.5\nshards: *v\n", "line 1: version: want a whole number, got 1.5\nline 1: shards: want a whole number, got 1.5"},
		{"merged", "version: 1\nassignments:\n  - &a {shards: 1, primary: u, epoch: 0.5}\n  - {<<: *a, shards: 2}\n", "line 3: epoch: want a whole number, got 0.5"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := topofile.Parse([]byte(tc.file + tail))
			if err == nil || err.Error() != tc.want {
				t.Errorf("Parse error:\n%v\nwant:\n%s", err, tc.want)
			}
		})
	}

	// Whole numbers in any YAML spelling still read.
	tp, err := topofile.Parse([]byte("version: 0x10\nshards: 1_000\nsafety: {max_shards_in_flight: +3}\n" + tail))
	if err != nil {
		t.Fatal(err)
	}
	if tp.Version != 16 || tp.Shards != 1000 || tp.Safety.MaxShardsInFlight != 3 {
		t.Errorf("version %d, shards %d, max_shards_in_flight %d; want 16, 1000, 3", tp.Version, tp.Shards, tp.Safety.MaxShardsInFlight)
	}
}

// A null item in a list is refused, not dropped or zeroed.
func TestParseRefusesEmptyListItems(t *testing.T) {
	tests := []struct {
		name string
		file string
		line int
	}{
		{"regions", "version: 1\nregions:\n  - name: a\n  -\n", 4},
		{"regions-tilde", "version: 1\nregions: [{name: a}, ~]\n", 2},
		{"units", "version: 1\nunits:\n  - null\n", 3},
		{"assignments", "version: 1\nassignments:\n  - {shards: 1, primary: a}\n  - ~\n", 4},
		{"standbys", "version: 1\nassignments:\n  - shards: 1\n    primary: a\n    standbys:\n      - b\n      -\n", 7},
		{"key", "version: 1\nkey:\n  - header: x\n  - ~\n", 4},
		{"zone-rules", "version: 1\nzones:\n  rules:\n    - ~\n", 4},
		{"methods", "version: 1\nzones:\n  rules:\n    - {methods: [GET, null], zone: czone}\n", 4},
		{"digits", "version: 1\nshard_rule: {kind: digits, digits: [1, ~]}\n", 2},
		{"shards", "version: 1\nassignments:\n  - shards: [1, ~]\n    primary: a\n", 3},
		{"aliased-null", "version: 1\nshards: &n ~\nregions: [*n]\n", 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := topofile.Parse([]byte(tc.file))
			if want := fmt.Sprintf("line %d: empty list item", tc.line); err == nil || err.Error() != want {
				t.Errorf("Parse error:\n%v\nwant:\n%s", err, want)
			}
		})
	}
}

// An explicit epoch 0 reaches Validate; an omitted (or null) one is 1.
func TestParseEpoch(t *testing.T) {
	for _, tc := range []struct {
		epoch string
		want  uint64
	}{{"", 1}, {", epoch: ~", 1}, {", epoch: 0", 0}, {", epoch: 1", 1}, {", epoch: 7", 7}} {
		tp, err := topofile.Parse([]byte("version: 1\nassignments:\n  - {shards: 1, primary: a" + tc.epoch + "}\n"))
		if err != nil {
			t.Fatalf("%q: %v", tc.epoch, err)
		}
		if got := tp.Assignments[0].Epoch; got != tc.want {
			t.Errorf("%q: epoch %d, want %d", tc.epoch, got, tc.want)
		}
	}

	data := readExample(t)
	data = []byte(strings.Replace(string(data), "{shards: global, primary: us-east-g,", "{shards: global, epoch: 0, primary: us-east-g,", 1))
	tp, err := topofile.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	var ve *routing.ValidationError
	if err := tp.Validate(); !errors.As(err, &ve) || len(ve.Problems) != 1 || ve.Problems[0].String() != "global: epoch must be 1 or more" {
		t.Errorf("Validate = %v; want only global: epoch must be 1 or more", err)
	}
	roundTrip(t, tp)
}

// Every shape problem of a file is reported at once, each with its line, in
// the order of the file.
func TestParseReportsEveryShapeProblem(t *testing.T) {
	file := `version: 1
shards: 1.5
key:
  - {header: a, cookie: b}
  - ~
  - {header: c, path: /d}
zones: {rulez: []}
assignments:
  - {shards: 99-5, primary: x}
  - {shards: "1,x", primary: y}
  - {primary: z}
  - {shards: [3, 70000], primary: w}
  - 5
  - {primary: v}
`
	_, err := topofile.Parse([]byte(file))
	if err == nil {
		t.Fatal("Parse succeeded")
	}
	want := []string{
		"line 2: shards: want a whole number, got 1.5",
		"line 4: key[0]: give exactly one of header, cookie, query or path",
		"line 5: empty list item",
		"line 6: key[2]: give exactly one of header, cookie, query or path",
		"line 7: unknown key rulez in zones",
		`line 9: shards: range "99-5" ends before it starts`,
		`line 10: shards: "x" is not a shard number`,
		`line 11: assignments[2] (primary "z"): no shards listed`,
		"line 12: shards: shard 70000 is beyond the largest possible shard 65535",
		"line 13: cannot unmarshal !!int `5` into an assignment",
		`line 14: assignments[5] (primary "v"): no shards listed`,
	}
	if got := strings.Split(err.Error(), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("Parse error:\n%v\nwant:\n%s", err, strings.Join(want, "\n"))
	}
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) || len(joined.Unwrap()) != len(want) {
		t.Errorf("Parse error is not %d joined errors: %#v", len(want), err)
	}
}

// A bad set named by many aliases is reported once.
func TestParseReportsAliasedProblemOnce(t *testing.T) {
	file := "version: 1\nassignments:\n  - {shards: &s 9-3, primary: a}\n  - {shards: *s, primary: b}\n  - {shards: *s, primary: c}\n"
	_, err := topofile.Parse([]byte(file))
	if want := `line 3: shards: range "9-3" ends before it starts`; err == nil || err.Error() != want {
		t.Errorf("Parse error:\n%v\nwant:\n%s", err, want)
	}
}

// Messages speak of the file, not of Go types.
func TestParseErrorsUseFileVocabulary(t *testing.T) {
	tests := []struct {
		name string
		file string
		want string
	}{
		{"top-level-key", "version: 1\nregion: []\n", "line 2: unknown key region at the top level"},
		{"key-entry-key", "version: 1\nkey:\n  - header: x-uid\n    cookei: uid\n", "line 4: unknown key cookei in a key entry"},
		{"unit-key", "version: 1\nunits:\n  - {name: a, capacity: 5}\n", "line 3: unknown key capacity in a unit"},
		{"region-key", "version: 1\nregions:\n  - {nam: a}\n", "line 3: unknown key nam in a region"},
		{"assignment-key", "version: 1\nassignments:\n  - {shards: 1, primary: a, standby: [b]}\n", "line 3: unknown key standby in an assignment"},
		{"rule-key", "version: 1\nshard_rule: {knd: mod}\n", "line 2: unknown key knd in shard_rule"},
		{"zone-rule-key", "version: 1\nzones:\n  rules:\n    - {zone: czone, prefix: /x}\n", "line 4: unknown key prefix in a zone rule"},
		{"safety-key", "version: 1\nsafety:\n  max_util: 0.5\n", "line 3: unknown key max_util in safety"},
		{"not-a-mapping", "- 1\n", "line 1: cannot unmarshal !!seq into the topology"},
		{"key-entry-scalar", "version: 1\nkey:\n  - x-uid\n", "line 3: cannot unmarshal !!str `x-uid` into a key entry"},
		{"regions-mapping", "version: 1\nregions: {name: east}\n", "line 2: cannot unmarshal !!map into a list of regions"},
		{"capacity", "version: 1\nunits:\n  - {name: a, capacity_rps: lots}\n", "line 3: cannot unmarshal !!str `lots` into a number"},
		{"write", "version: 1\nzones:\n  rules:\n    - {zone: czone, write: maybe}\n", "line 4: cannot unmarshal !!str `maybe` into true or false"},
		{"digits-scalar", "version: 1\nshard_rule: {digits: three}\n", "line 2: cannot unmarshal !!str `three` into a list of whole numbers"},
		{"name-list", "version: 1\nregions: [{name: [a]}]\n", "line 2: cannot unmarshal !!seq into a string"},
		{"standbys-scalar", "version: 1\nassignments: [{shards: 1, primary: a, standbys: b}]\n", "line 2: cannot unmarshal !!str `b` into a list of strings"},
	}
	goType := regexp.MustCompile(`topofile\.|into (u?int(64)?|float64|bool|string)$|\[\]`)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := topofile.Parse([]byte(tc.file))
			if err == nil || err.Error() != tc.want {
				t.Errorf("Parse error:\n%v\nwant:\n%s", err, tc.want)
			}
			if err != nil && goType.MatchString(err.Error()) {
				t.Errorf("error %q names a Go type", err)
			}
		})
	}
}

// Encode leaves out what is the default, and round trip still holds.
func TestEncodeLeavesOutDefaults(t *testing.T) {
	tp, err := topofile.Parse([]byte(minimal))
	if err != nil {
		t.Fatal(err)
	}
	tp.Shards = 0
	enc := roundTrip(t, tp)
	for _, noise := range []string{"shards: 0\n", "shard_rule:", `kind: ""`, "key:", "zones:", "safety:", "{}", "[]"} {
		if strings.Contains(string(enc), noise) {
			t.Errorf("encoded file holds %q:\n%s", noise, enc)
		}
	}

	// The example has every section: they stay, and none is empty.
	tp, err = topofile.Parse(readExample(t))
	if err != nil {
		t.Fatal(err)
	}
	enc = roundTrip(t, tp)
	for _, key := range []string{"\nshards: 100\n", "\nshard_rule:\n  kind: mod\n", "\nkey:\n", "\nzones:\n", "\nsafety:\n"} {
		if !strings.Contains(string(enc), key) {
			t.Errorf("encoded example lacks %q:\n%s", key, enc)
		}
	}
	if m := regexp.MustCompile(`(?m): (""|\{\}|\[\]|0)$`).Find(enc); m != nil {
		t.Errorf("encoded example holds an empty value %q:\n%s", m, enc)
	}
}

// STYLE.md: every package has a doc.go saying what it owns and must not
// do, and the package comment is there only.
func TestPackageCommentInDocGo(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.PackageClauseOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case name == "doc.go":
			found = f.Doc != nil && strings.Contains(f.Doc.Text(), "must not")
		case f.Doc != nil:
			t.Errorf("%s holds a package comment; keep it in doc.go", name)
		}
	}
	if !found {
		t.Error("no doc.go with a package comment saying what the package must not do")
	}
}
