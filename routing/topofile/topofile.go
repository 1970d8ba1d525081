// Package topofile decodes topology files (YAML, snake_case keys) into
// routing.Topology structs. It checks the file's shape (unknown keys, wrong
// types, bad shard ranges) with line numbers; routing.Topology.Validate
// checks the meaning.
package topofile

import (
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/cellmesh/cellmesh/routing"
	"go.yaml.in/yaml/v3"
)

// MaxFileSize bounds a topology file: 65,536 shards listed one by one with
// standbys fit in a few MiB.
const MaxFileSize = 32 << 20

// File is the YAML form of a topology. See examples/topology/three-regions.yaml.
type File struct {
	Version     uint64       `yaml:"version"`
	Shards      int          `yaml:"shards"`
	ShardRule   RuleFile     `yaml:"shard_rule"`
	Key         []KeyFile    `yaml:"key"`
	Zones       ZonesFile    `yaml:"zones"`
	Safety      SafetyFile   `yaml:"safety"`
	Regions     []RegionFile `yaml:"regions"`
	Units       []UnitFile   `yaml:"units"`
	Assignments []AssignFile `yaml:"assignments"`
}

// RuleFile is the shard rule.
type RuleFile struct {
	Kind   string `yaml:"kind"`
	Digits []int  `yaml:"digits,omitempty"`
}

// KeyFile is one key source: exactly one field is set.
type KeyFile struct {
	Header string `yaml:"header,omitempty"`
	Cookie string `yaml:"cookie,omitempty"`
	Query  string `yaml:"query,omitempty"`
	Path   string `yaml:"path,omitempty"`
	line   int
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
	MinServingUnits           int     `yaml:"min_serving_units,omitempty"`
	MaxShardsInFlight         int     `yaml:"max_shards_in_flight,omitempty"`
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
// standbys. Epoch defaults to 1 and State to serving.
type AssignFile struct {
	Shards   ShardSet `yaml:"shards"`
	Primary  string   `yaml:"primary"`
	Standbys []string `yaml:"standbys,omitempty"`
	Epoch    uint64   `yaml:"epoch,omitempty"`
	State    string   `yaml:"state,omitempty"`
}

// ShardSet is a set of shards written as "0-16", "7", "global", a
// comma-separated list of those, or a YAML list of them.
type ShardSet []int

// maxExpanded bounds how many shard numbers one file may list in all.
const maxExpanded = 2 * routing.MaxShards

// UnmarshalYAML decodes a scalar or a sequence of scalars.
func (s *ShardSet) UnmarshalYAML(n *yaml.Node) error {
	var parts []string
	switch n.Kind {
	case yaml.ScalarNode:
		parts = strings.Split(n.Value, ",")
	case yaml.SequenceNode:
		for _, c := range n.Content {
			if c.Kind != yaml.ScalarNode {
				return fmt.Errorf("line %d: shards: want a shard, a range like 0-16 or global", c.Line)
			}
			parts = append(parts, strings.Split(c.Value, ",")...)
		}
	default:
		return fmt.Errorf("line %d: shards: want a shard, a range like 0-16, global, or a list of them", n.Line)
	}
	for _, p := range parts {
		p = strings.TrimSpace(p)
		if p == "global" {
			*s = append(*s, routing.GlobalShard)
			continue
		}
		lo, hi, isRange := strings.Cut(p, "-")
		a, err1 := parseShard(lo)
		b, err2 := a, error(nil)
		if isRange {
			b, err2 = parseShard(hi)
		}
		if err := errors.Join(err1, err2); err != nil {
			return fmt.Errorf("line %d: shards: %q: %v", n.Line, p, err)
		}
		if b < a {
			return fmt.Errorf("line %d: shards: range %q ends before it starts", n.Line, p)
		}
		if len(*s)+(b-a+1) > maxExpanded {
			return fmt.Errorf("line %d: shards: the file lists more than %d shards", n.Line, maxExpanded)
		}
		for i := a; i <= b; i++ {
			*s = append(*s, i)
		}
	}
	return nil
}

func parseShard(s string) (int, error) {
	s = strings.TrimSpace(s)
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is not a shard number", s)
	}
	if v >= routing.MaxShards {
		return 0, fmt.Errorf("shard %d is beyond the largest possible shard %d", v, routing.MaxShards-1)
	}
	return v, nil
}

// UnmarshalYAML keeps the line of a key source for errors. n.Decode does not
// inherit the file decoder's KnownFields, so unknown keys are refused here.
func (k *KeyFile) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind == yaml.MappingNode {
		var unknown []string
		for i := 0; i+1 < len(n.Content); i += 2 {
			switch key := n.Content[i]; key.Value {
			case "header", "cookie", "query", "path":
			default:
				unknown = append(unknown, fmt.Sprintf("line %d: field %s not found in type topofile.KeyFile", key.Line, key.Value))
			}
		}
		if len(unknown) > 0 {
			return &yaml.TypeError{Errors: unknown}
		}
	}
	type plain KeyFile
	var p plain
	if err := n.Decode(&p); err != nil {
		return err
	}
	*k = KeyFile(p)
	k.line = n.Line
	return nil
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

func (f *File) isZero() bool {
	return f.Version == 0 && f.Shards == 0 && f.ShardRule.Kind == "" && len(f.ShardRule.Digits) == 0 && len(f.Key) == 0 &&
		f.Zones.Default == "" && len(f.Zones.Rules) == 0 && f.Safety == (SafetyFile{}) &&
		len(f.Regions) == 0 && len(f.Units) == 0 && len(f.Assignments) == 0
}

// Parse decodes a topology from YAML. Unknown keys, wrong types, a second
// document and malformed shard sets are errors with their line.
func Parse(data []byte) (*routing.Topology, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, errEmpty
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var f File
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errEmpty
		}
		if strings.Contains(err.Error(), "found character that cannot start any token") && bytes.ContainsRune(data, '\t') {
			return nil, fmt.Errorf("decode YAML: %w (YAML does not allow tabs for indentation; indent with spaces)", err)
		}
		return nil, fmt.Errorf("decode YAML: %w", err)
	}
	if f.isZero() {
		return nil, errEmpty
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, errors.New("decode YAML: the file holds more than one document; keep one topology per file")
	}
	return f.Topology()
}

// Topology converts the file form to the model.
func (f *File) Topology() (*routing.Topology, error) {
	t := &routing.Topology{
		Version: f.Version,
		Shards:  f.Shards,
		Rule:    routing.ShardRule{Kind: routing.RuleKind(f.ShardRule.Kind), Digits: f.ShardRule.Digits},
		Zones:   routing.ZoneRules{Default: routing.Zone(f.Zones.Default)},
		Safety: routing.Safety{
			MaxUtilization:            f.Safety.MaxUtilization,
			MinServingUnits:           f.Safety.MinServingUnits,
			MaxShardsInFlight:         f.Safety.MaxShardsInFlight,
			AllowNoCrossRegionStandby: f.Safety.AllowNoCrossRegionStandby,
		},
	}
	var errs []error
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
			errs = append(errs, fmt.Errorf("line %d: key[%d]: give exactly one of header, cookie, query or path", k.line, i))
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
	total := 0
	for _, a := range f.Assignments {
		total += len(a.Shards)
	}
	if total > maxExpanded {
		return nil, fmt.Errorf("assignments: the file lists more than %d shards", maxExpanded)
	}
	for i, a := range f.Assignments {
		if len(a.Shards) == 0 {
			errs = append(errs, fmt.Errorf("assignments[%d] (primary %q): no shards listed", i, a.Primary))
		}
		epoch, state := a.Epoch, routing.State(a.State)
		if epoch == 0 {
			epoch = 1
		}
		if state == "" {
			state = routing.StateServing
		}
		for _, s := range a.Shards {
			t.Assignments = append(t.Assignments, routing.Assignment{
				Shard: s, Primary: a.Primary, Standbys: append([]string(nil), a.Standbys...), Epoch: epoch, State: state,
			})
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return t, nil
}

// FromTopology returns the file form of t. Runs of consecutive shards with
// the same primary, standbys, epoch and state become one range.
func FromTopology(t *routing.Topology) *File {
	f := &File{
		Version:   t.Version,
		Shards:    t.Shards,
		ShardRule: RuleFile{Kind: string(t.Rule.Kind), Digits: t.Rule.Digits},
		Zones:     ZonesFile{Default: string(t.Zones.Default)},
		Safety: SafetyFile{
			MaxUtilization:            t.Safety.MaxUtilization,
			MinServingUnits:           t.Safety.MinServingUnits,
			MaxShardsInFlight:         t.Safety.MaxShardsInFlight,
			AllowNoCrossRegionStandby: t.Safety.AllowNoCrossRegionStandby,
		},
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
		set := make(ShardSet, 0, j-i)
		for k := i; k < j; k++ {
			set = append(set, as[k].Shard)
		}
		f.Assignments = append(f.Assignments, AssignFile{Shards: set, Primary: a.Primary, Standbys: a.Standbys, Epoch: a.Epoch, State: string(a.State)})
		i = j
	}
	return f
}

// MarshalYAML writes a set as "global", "7", "0-16" or "0-3,9".
func (s ShardSet) MarshalYAML() (any, error) {
	var parts []string
	for i := 0; i < len(s); {
		j := i + 1
		for s[i] >= 0 && j < len(s) && s[j] == s[j-1]+1 {
			j++
		}
		switch {
		case s[i] == routing.GlobalShard:
			parts = append(parts, "global")
		case j-i == 1:
			parts = append(parts, strconv.Itoa(s[i]))
		default:
			parts = append(parts, fmt.Sprintf("%d-%d", s[i], s[j-1]))
		}
		i = j
	}
	return strings.Join(parts, ","), nil
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
