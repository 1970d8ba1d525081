package topofile

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"

	"github.com/cellmesh/cellmesh/routing"
	"go.yaml.in/yaml/v3"
)

// MaxFileSize bounds a topology file: 65,536 shards listed one by one with
// standbys fit in a few MiB.
const MaxFileSize = 32 << 20

// File is the YAML form of a topology. See examples/topology/three-regions.yaml.
// A zero field means its default and Encode leaves it out.
type File struct {
	Version     Uint         `yaml:"version"`
	Shards      Int          `yaml:"shards,omitempty"`
	ShardRule   RuleFile     `yaml:"shard_rule,omitempty"`
	Key         []KeyFile    `yaml:"key,omitempty"`
	Zones       ZonesFile    `yaml:"zones,omitempty"`
	Safety      SafetyFile   `yaml:"safety,omitempty"`
	Regions     []RegionFile `yaml:"regions"`
	Units       []UnitFile   `yaml:"units"`
	Assignments []AssignFile `yaml:"assignments"`
}

// RuleFile is the shard rule.
type RuleFile struct {
	Kind   string `yaml:"kind,omitempty"`
	Digits []Int  `yaml:"digits,omitempty"`
}

// KeyFile is one key source: exactly one field is set.
type KeyFile struct {
	Header string `yaml:"header,omitempty"`
	Cookie string `yaml:"cookie,omitempty"`
	Query  string `yaml:"query,omitempty"`
	Path   string `yaml:"path,omitempty"`

	pos position // see AssignFile.pos
}

// ZonesFile holds the zone rules.
type ZonesFile struct {
	Default string     `yaml:"default,omitempty"`
	Rules   []ZoneFile `yaml:"rules,omitempty"`
}

// ZoneFile is one zone rule.
type ZoneFile struct {
	Methods    []string `yaml:"methods,omitempty"`
	PathPrefix string   `yaml:"path_prefix,omitempty"`
	Path       string   `yaml:"path,omitempty"`
	Zone       string   `yaml:"zone"`
	Write      *bool    `yaml:"write,omitempty"`
}

// SafetyFile holds the safety limits; zero means the default.
type SafetyFile struct {
	MaxUtilization            float64 `yaml:"max_utilization,omitempty"`
	MinServingUnits           Int     `yaml:"min_serving_units,omitempty"`
	MaxShardsInFlight         Int     `yaml:"max_shards_in_flight,omitempty"`
	AllowNoCrossRegionStandby bool    `yaml:"allow_no_cross_region_standby,omitempty"`
}

// RegionFile is a region.
type RegionFile struct {
	Name string `yaml:"name"`
}

// UnitFile is a unit.
type UnitFile struct {
	Name        string  `yaml:"name"`
	Region      string  `yaml:"region"`
	Kind        string  `yaml:"kind"`
	CapacityRPS float64 `yaml:"capacity_rps"`
}

// AssignFile assigns a set of shards (or the global writer) to a primary and
// standbys. A nil Epoch means 1 and an empty State serving; an epoch written
// as 0 stays 0, for Validate to refuse.
type AssignFile struct {
	Shards   ShardSet `yaml:"shards"`
	Primary  string   `yaml:"primary"`
	Standbys []string `yaml:"standbys,omitempty"`
	Epoch    *Uint    `yaml:"epoch,omitempty"`
	State    string   `yaml:"state,omitempty"`

	// pos is where Parse found the entry, for messages; zero when unknown.
	pos position
}

// Load reads and decodes a topology file. It does not validate the
// topology's meaning; call Validate or routing.Compile for that.
func Load(path string) (*routing.Topology, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read topology: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("read topology %s: %w", path, err)
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("topology %s is larger than %d MiB", path, MaxFileSize>>20)
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("topology %s: %w", path, err)
	}
	return t, nil
}

var errEmpty = errors.New("empty topology: want a YAML mapping with version, regions, units and assignments")

// Parse decodes a topology from YAML and checks its shape. It returns every
// shape problem at once, joined, each with its line: unknown keys, wrong
// types, numbers that are not whole, empty list items, malformed shard sets,
// key entries without exactly one source, and more shards than a topology
// can hold. A second document is an error too.
func Parse(data []byte) (*routing.Topology, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errEmpty
	}
	// The decoder into File drops or zeroes empty list items and names no
	// key in its errors: a first pass reads the YAML as nodes to find those
	// and the line of each entry. yaml.Node.Decode would not refuse unknown
	// keys, so the second pass decodes File from the text again.
	root, err := parseNodes(data)
	if err != nil {
		return nil, err
	}
	if root.ShortTag() == "!!null" || root.Kind == yaml.MappingNode && len(root.Content) == 0 {
		return nil, errEmpty
	}
	c := newChecker()
	c.check(root, reflect.TypeFor[File](), "")
	problems := c.problems

	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f File
	if err := dec.Decode(&f); err != nil {
		var te *yaml.TypeError
		if !errors.As(err, &te) {
			return nil, fmt.Errorf("decode YAML: %w", err)
		}
		for _, msg := range te.Errors {
			if p := decoderProblem(msg); !c.keyless[p] {
				problems = append(problems, p)
			}
		}
	}
	setPositions(f.Key, positions(root, "key"), func(k *KeyFile, p position) { k.pos = p })
	setPositions(f.Assignments, positions(root, "assignments"), func(a *AssignFile, p position) { a.pos = p })
	t, shape := f.topology()
	if problems = append(problems, shape...); len(problems) > 0 {
		return nil, joinProblems(problems)
	}
	return t, nil
}

// parseNodes reads the one document in data and returns its root node.
func parseNodes(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errEmpty
		}
		if strings.Contains(err.Error(), "found character that cannot start any token") && bytes.ContainsRune(data, '\t') {
			return nil, fmt.Errorf("decode YAML: %w (YAML does not allow tabs for indentation; indent with spaces)", err)
		}
		return nil, fmt.Errorf("decode YAML: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, errors.New("decode YAML: the file holds more than one document; keep one topology per file")
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) != 1 {
		return nil, errEmpty
	}
	return resolve(doc.Content[0]), nil
}

// setPositions gives each entry its position, when the positions found
// match the entries decoded.
func setPositions[E any](entries []E, ps []position, set func(*E, position)) {
	if len(ps) != len(entries) {
		return
	}
	for i := range entries {
		set(&entries[i], ps[i])
	}
}

// Topology converts the file form to the model. It checks the shape the
// types cannot hold: shard sets, key entries with exactly one source, and
// how many shards the assignments list in all, which it sums from the
// ranges before it expands any. It returns every such problem at once.
func (f *File) Topology() (*routing.Topology, error) {
	t, problems := f.topology()
	if len(problems) > 0 {
		return nil, joinProblems(problems)
	}
	return t, nil
}

func (f *File) topology() (*routing.Topology, []problem) {
	t := &routing.Topology{
		Version: uint64(f.Version),
		Shards:  int(f.Shards),
		Rule:    routing.ShardRule{Kind: routing.RuleKind(f.ShardRule.Kind)},
		Zones:   routing.ZoneRules{Default: routing.Zone(f.Zones.Default)},
		Safety: routing.Safety{
			MaxUtilization:            f.Safety.MaxUtilization,
			MinServingUnits:           int(f.Safety.MinServingUnits),
			MaxShardsInFlight:         int(f.Safety.MaxShardsInFlight),
			AllowNoCrossRegionStandby: f.Safety.AllowNoCrossRegionStandby,
		},
	}
	for _, d := range f.ShardRule.Digits {
		t.Rule.Digits = append(t.Rule.Digits, int(d))
	}
	var problems []problem
	for i, k := range f.Key {
		var set []routing.KeySource
		for _, c := range []struct {
			kind routing.KeySourceKind
			v    string
		}{{routing.KeyHeader, k.Header}, {routing.KeyCookie, k.Cookie}, {routing.KeyQuery, k.Query}, {routing.KeyPath, k.Path}} {
			if c.v != "" {
				set = append(set, routing.KeySource{Kind: c.kind, Name: c.v})
			}
		}
		if len(set) != 1 {
			at := k.pos.in(i)
			problems = append(problems, problem{at.line, fmt.Sprintf("key[%d]: give exactly one of header, cookie, query or path", at.index)})
			continue
		}
		t.Keys = append(t.Keys, set[0])
	}
	for _, z := range f.Zones.Rules {
		t.Zones.Rules = append(t.Zones.Rules, routing.ZoneRule{
			Methods: z.Methods, PathPrefix: z.PathPrefix, Path: z.Path, Zone: routing.Zone(z.Zone), Write: z.Write,
		})
	}
	for _, r := range f.Regions {
		t.Regions = append(t.Regions, routing.Region{Name: r.Name})
	}
	for _, u := range f.Units {
		t.Units = append(t.Units, routing.Unit{Name: u.Name, Region: u.Region, Kind: routing.Kind(u.Kind), CapacityRPS: u.CapacityRPS})
	}

	// Sum the sizes of the sets before expanding any.
	seen := map[*yaml.Node]*shardSet{}
	sets := make([]*shardSet, len(f.Assignments))
	total := 0
	for i := range f.Assignments {
		a := &f.Assignments[i]
		at := a.pos.in(i)
		s := a.Shards.read(seen)
		sets[i] = s
		if !s.reported {
			s.reported = true
			problems = append(problems, s.problems...)
		}
		if s.size == 0 && len(s.problems) == 0 {
			problems = append(problems, problem{at.line, fmt.Sprintf("assignments[%d] (primary %q): no shards listed", at.index, a.Primary)})
		}
		if total <= maxExpanded && total+s.size > maxExpanded {
			problems = append(problems, problem{at.line, fmt.Sprintf("assignments[%d]: the file lists more than %d shards in all, twice the most a topology can have", at.index, maxExpanded)})
		}
		total = min(total+s.size, maxExpanded+1)
	}
	if len(problems) > 0 {
		return nil, problems
	}

	t.Assignments = make([]routing.Assignment, 0, total)
	for i, a := range f.Assignments {
		epoch, state := uint64(1), routing.State(a.State)
		if a.Epoch != nil {
			epoch = uint64(*a.Epoch)
		}
		if state == "" {
			state = routing.StateServing
		}
		for _, r := range sets[i].ranges {
			for s := r.Lo; s <= r.Hi; s++ {
				t.Assignments = append(t.Assignments, routing.Assignment{
					Shard: s, Primary: a.Primary, Standbys: slices.Clone(a.Standbys), Epoch: epoch, State: state,
				})
			}
		}
	}
	return t, nil
}

// FromTopology returns the file form of t. Runs of consecutive shards with
// the same primary, standbys, epoch and state become one range.
func FromTopology(t *routing.Topology) *File {
	f := &File{
		Version:   Uint(t.Version),
		Shards:    Int(t.Shards),
		ShardRule: RuleFile{Kind: string(t.Rule.Kind)},
		Zones:     ZonesFile{Default: string(t.Zones.Default)},
		Safety: SafetyFile{
			MaxUtilization:            t.Safety.MaxUtilization,
			MinServingUnits:           Int(t.Safety.MinServingUnits),
			MaxShardsInFlight:         Int(t.Safety.MaxShardsInFlight),
			AllowNoCrossRegionStandby: t.Safety.AllowNoCrossRegionStandby,
		},
	}
	for _, d := range t.Rule.Digits {
		f.ShardRule.Digits = append(f.ShardRule.Digits, Int(d))
	}
	for _, k := range t.Keys {
		var kf KeyFile
		switch k.Kind {
		case routing.KeyHeader:
			kf.Header = k.Name
		case routing.KeyCookie:
			kf.Cookie = k.Name
		case routing.KeyQuery:
			kf.Query = k.Name
		case routing.KeyPath:
			kf.Path = k.Name
		}
		f.Key = append(f.Key, kf)
	}
	for _, z := range t.Zones.Rules {
		f.Zones.Rules = append(f.Zones.Rules, ZoneFile{Methods: z.Methods, PathPrefix: z.PathPrefix, Path: z.Path, Zone: string(z.Zone), Write: z.Write})
	}
	for _, r := range t.Regions {
		f.Regions = append(f.Regions, RegionFile{Name: r.Name})
	}
	for _, u := range t.Units {
		f.Units = append(f.Units, UnitFile{Name: u.Name, Region: u.Region, Kind: string(u.Kind), CapacityRPS: u.CapacityRPS})
	}
	as := slices.Clone(t.Assignments)
	slices.SortStableFunc(as, func(a, b routing.Assignment) int { return cmp.Compare(a.Shard, b.Shard) })
	same := func(a, b routing.Assignment) bool {
		return a.Primary == b.Primary && slices.Equal(a.Standbys, b.Standbys) && a.Epoch == b.Epoch && a.State == b.State
	}
	for i := 0; i < len(as); {
		j := i + 1
		for as[i].Shard >= 0 && j < len(as) && as[j].Shard == as[j-1].Shard+1 && same(as[i], as[j]) {
			j++
		}
		a := as[i]
		epoch := Uint(a.Epoch)
		f.Assignments = append(f.Assignments, AssignFile{
			Shards:  ShardSet{Ranges: []ShardRange{{as[i].Shard, as[j-1].Shard}}},
			Primary: a.Primary, Standbys: a.Standbys, Epoch: &epoch, State: string(a.State),
		})
		i = j
	}
	return f
}

// Encode writes t as YAML that Parse reads back to an equal topology.
func Encode(t *routing.Topology) ([]byte, error) {
	var b bytes.Buffer
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	if err := enc.Encode(FromTopology(t)); err != nil {
		return nil, fmt.Errorf("encode topology: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("encode topology: %w", err)
	}
	return b.Bytes(), nil
}
