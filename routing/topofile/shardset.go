package topofile

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/cellmesh/cellmesh/routing"
	"go.yaml.in/yaml/v3"
)

// ShardSet is the shards of one assignment entry, written as "0-16", "7",
// "global", a comma-separated list of those, or a YAML list of them.
//
// A set is kept as written and expanded to shards only by File.Topology,
// once it has checked that the whole file lists few enough: a file of a few
// KiB can name billions of shards, the more so with aliases.
type ShardSet struct {
	// Ranges are the runs of shards in the order written, for a set built
	// in Go. A decoded set keeps its YAML instead, for File.Topology.
	Ranges []ShardRange

	// node is the YAML the set was decoded from, in place of Ranges.
	// File.Topology reads it once however many aliases name it: parsing it
	// on each use would let aliases multiply the work.
	node *yaml.Node
}

// ShardRange is the shards Lo to Hi, both included. {GlobalShard,
// GlobalShard} is the global writer.
type ShardRange struct {
	Lo, Hi int
}

// maxExpanded bounds how many shards the assignments of one file may list
// in all: twice the most a topology can have, so that Validate still sees
// and reports shards assigned twice.
const maxExpanded = 2 * routing.MaxShards

// UnmarshalYAML keeps the node; File.Topology reads and checks it.
func (s *ShardSet) UnmarshalYAML(n *yaml.Node) error {
	*s = ShardSet{node: n}
	return nil
}

// MarshalYAML writes the set as "global", "7", "0-16" or "0-3,9".
func (s ShardSet) MarshalYAML() (any, error) {
	rs := s.Ranges
	if s.node != nil {
		p := parseShardSet(s.node)
		if len(p.problems) > 0 {
			return nil, p.problems[0]
		}
		rs = p.ranges
	}
	parts := make([]string, len(rs))
	for i, r := range rs {
		switch {
		case r.Lo == routing.GlobalShard && r.Hi == routing.GlobalShard:
			parts[i] = "global"
		case r.Lo == r.Hi:
			parts[i] = strconv.Itoa(r.Lo)
		default:
			parts[i] = fmt.Sprintf("%d-%d", r.Lo, r.Hi)
		}
	}
	return strings.Join(parts, ","), nil
}

// shardSet is a set read and checked.
type shardSet struct {
	ranges   []ShardRange
	size     int // shards listed, at most maxExpanded+1
	problems []problem
	reported bool // problems are in the caller's list already
}

// read returns s read and checked. Sets decoded from one node (through
// aliases) share one result in seen.
func (s *ShardSet) read(seen map[*yaml.Node]*shardSet) *shardSet {
	if s.node == nil {
		return checkRanges(s.Ranges)
	}
	p := seen[s.node]
	if p == nil {
		p = parseShardSet(s.node)
		seen[s.node] = p
	}
	return p
}

// checkRanges checks ranges built in Go.
func checkRanges(rs []ShardRange) *shardSet {
	p := &shardSet{ranges: rs}
	for _, r := range rs {
		switch {
		case r.Lo == routing.GlobalShard && r.Hi == routing.GlobalShard:
		case r.Lo < 0 || r.Hi >= routing.MaxShards:
			p.problems = append(p.problems, problem{msg: fmt.Sprintf("shards: range %d-%d is not within 0-%d", r.Lo, r.Hi, routing.MaxShards-1)})
			continue
		case r.Hi < r.Lo:
			p.problems = append(p.problems, problem{msg: fmt.Sprintf("shards: range %d-%d ends before it starts", r.Lo, r.Hi)})
			continue
		}
		p.add(r)
	}
	return p
}

func (p *shardSet) add(r ShardRange) {
	p.size = min(p.size+r.Hi-r.Lo+1, maxExpanded+1)
}

// parseShardSet reads a set from a scalar or a list of scalars. It does not
// expand ranges.
func parseShardSet(n *yaml.Node) *shardSet {
	p := &shardSet{}
	switch n.Kind {
	case yaml.ScalarNode:
		p.parse(n.Value, n.Line)
	case yaml.SequenceNode:
		for _, c := range n.Content {
			if c.Kind == yaml.AliasNode {
				c = c.Alias
			}
			switch {
			case c.ShortTag() == "!!null":
				p.problems = append(p.problems, problem{c.Line, "empty list item"})
			case c.Kind != yaml.ScalarNode:
				p.problems = append(p.problems, problem{c.Line, "shards: want a shard, a range like 0-16 or global"})
			default:
				p.parse(c.Value, c.Line)
			}
		}
	default:
		p.problems = append(p.problems, problem{n.Line, "shards: want a shard, a range like 0-16, global, or a list of them"})
	}
	return p
}

// parse reads a comma-separated list of shards, ranges and global.
func (p *shardSet) parse(list string, line int) {
	for part := range strings.SplitSeq(list, ",") {
		part = strings.TrimSpace(part)
		if part == "global" {
			p.ranges = append(p.ranges, ShardRange{routing.GlobalShard, routing.GlobalShard})
			p.add(ShardRange{routing.GlobalShard, routing.GlobalShard})
			continue
		}
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := parseShard(lo)
		b := a
		if err == nil && isRange {
			b, err = parseShard(hi)
		}
		switch {
		case err != nil && isRange:
			p.problems = append(p.problems, problem{line, fmt.Sprintf("shards: %q: %v", part, err)})
		case err != nil:
			p.problems = append(p.problems, problem{line, "shards: " + err.Error()})
		case b < a:
			p.problems = append(p.problems, problem{line, fmt.Sprintf("shards: range %q ends before it starts", part)})
		default:
			p.ranges = append(p.ranges, ShardRange{a, b})
			p.add(ShardRange{a, b})
		}
	}
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
