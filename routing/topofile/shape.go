package topofile

import (
	"cmp"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// problem is one thing wrong with a file's shape. line is 0 when unknown.
type problem struct {
	line int
	msg  string
}

func (p problem) Error() string {
	if p.line > 0 {
		return fmt.Sprintf("line %d: %s", p.line, p.msg)
	}
	return p.msg
}

// joinProblems returns every problem once, in the order of the file; those
// without a line come last.
func joinProblems(ps []problem) error {
	slices.SortStableFunc(ps, func(a, b problem) int {
		return cmp.Compare(uint(a.line-1), uint(b.line-1)) // 0 wraps to the largest
	})
	seen := make(map[problem]bool, len(ps))
	var errs []error
	for _, p := range ps {
		if !seen[p] {
			seen[p] = true
			errs = append(errs, p)
		}
	}
	return errors.Join(errs...)
}

// vocabulary rewrites the YAML decoder's messages, which name Go types, into
// the words of the file.
var vocabulary = strings.NewReplacer(
	": field ", ": unknown key ",
	" not found in type topofile.File", " at the top level",
	" not found in type topofile.RuleFile", " in shard_rule",
	" not found in type topofile.KeyFile", " in a key entry",
	" not found in type topofile.ZonesFile", " in zones",
	" not found in type topofile.ZoneFile", " in a zone rule",
	" not found in type topofile.SafetyFile", " in safety",
	" not found in type topofile.RegionFile", " in a region",
	" not found in type topofile.UnitFile", " in a unit",
	" not found in type topofile.AssignFile", " in an assignment",
	" into topofile.File", " into the topology",
	" into topofile.RuleFile", " into shard_rule",
	" into topofile.KeyFile", " into a key entry",
	" into topofile.ZonesFile", " into zones",
	" into topofile.ZoneFile", " into a zone rule",
	" into topofile.SafetyFile", " into safety",
	" into topofile.RegionFile", " into a region",
	" into topofile.UnitFile", " into a unit",
	" into topofile.AssignFile", " into an assignment",
	" into topofile.ShardSet", " into shards",
	" into topofile.Int", " into a whole number",
	" into topofile.Uint", " into a whole number",
	" into []topofile.KeyFile", " into a list of key entries",
	" into []topofile.ZoneFile", " into a list of zone rules",
	" into []topofile.RegionFile", " into a list of regions",
	" into []topofile.UnitFile", " into a list of units",
	" into []topofile.AssignFile", " into a list of assignments",
	" into []topofile.Int", " into a list of whole numbers",
	" into []string", " into a list of strings",
	" into float64", " into a number",
	" into bool", " into true or false",
	" into string", " into a string",
)

// decoderProblem turns a message of the YAML decoder, "line N: ...", into a
// problem in the words of the file.
func decoderProblem(msg string) problem {
	msg = vocabulary.Replace(msg)
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if num, text, ok := strings.Cut(rest, ": "); ok {
			if line, err := strconv.Atoi(num); err == nil {
				return problem{line, text}
			}
		}
	}
	return problem{msg: msg}
}

// checker finds what the YAML decoder lets through: empty list items, which
// it drops or zeroes, and numbers that are not whole where the Go type says
// a whole number is due, which Int and Uint refuse without naming the key.
type checker struct {
	problems []problem
	// keyless holds the checker's whole-number problems as Int and Uint word
	// them, to drop those in favour of the checker's, which name the key.
	keyless map[problem]bool
	// seen holds the anchored nodes checked: aliases may name them again.
	seen map[visit]bool
}

type visit struct {
	n *yaml.Node
	t reflect.Type
}

var (
	intType      = reflect.TypeFor[Int]()
	uintType     = reflect.TypeFor[Uint]()
	shardSetType = reflect.TypeFor[ShardSet]()
)

func newChecker() *checker {
	return &checker{keyless: map[problem]bool{}, seen: map[visit]bool{}}
}

// check checks n, which decodes into a t under key.
func (c *checker) check(n *yaml.Node, t reflect.Type, key string) {
	n = resolve(n)
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Anchor != "" {
		if c.seen[visit{n, t}] {
			return
		}
		c.seen[visit{n, t}] = true
	}
	if n.ShortTag() == "!!null" {
		return
	}
	switch {
	case t == intType:
		_, p := wholeNumber[int](n)
		c.whole(n, key, p)
	case t == uintType:
		_, p := wholeNumber[uint64](n)
		c.whole(n, key, p)
	case t == shardSetType:
		// File.Topology reads shard sets.
	case t.Kind() == reflect.Slice && n.Kind == yaml.SequenceNode:
		for _, item := range n.Content {
			if resolve(item).ShortTag() == "!!null" {
				c.problems = append(c.problems, problem{item.Line, "empty list item"})
				continue
			}
			c.check(item, t.Elem(), key)
		}
	case t.Kind() == reflect.Struct && n.Kind == yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.ShortTag() == "!!merge" {
				if v = resolve(v); v.Kind == yaml.SequenceNode {
					for _, m := range v.Content {
						c.check(m, t, key)
					}
				} else {
					c.check(v, t, key)
				}
				continue
			}
			if f, ok := fieldFor(t, k.Value); ok {
				c.check(v, f.Type, k.Value)
			}
		}
	}
}

func (c *checker) whole(n *yaml.Node, key, p string) {
	if p == "" {
		return
	}
	c.keyless[problem{n.Line, p}] = true
	c.problems = append(c.problems, problem{n.Line, key + ": " + p})
}

// fieldFor returns the field of struct t that the YAML key name sets.
func fieldFor(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if f.IsExported() && tag == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func resolve(n *yaml.Node) *yaml.Node {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		return n.Alias
	}
	return n
}

// position is where Parse found an entry of a list: its line and its index
// in the file, which differs from its index among the entries decoded when
// the decoder dropped an item before it.
type position struct {
	line, index int
}

// in returns p, or index i of a list built in Go.
func (p position) in(i int) position {
	if p.line == 0 {
		return position{0, i}
	}
	return p
}

// positions returns the position of each entry the decoder makes of the
// list under key in the top-level mapping root: one per item that is a
// mapping. The decoder drops the others (null items, scalars), and the
// checker or the decoder reports them. positions returns nil when it finds
// no list.
func positions(root *yaml.Node, key string) []position {
	list := lookup(root, key)
	if list == nil || list.Kind != yaml.SequenceNode {
		return nil
	}
	ps := make([]position, 0, len(list.Content))
	for i, item := range list.Content {
		if resolve(item).Kind == yaml.MappingNode {
			ps = append(ps, position{item.Line, i})
		}
	}
	return ps
}

// lookup returns the value of key in mapping m, or in a mapping merged into
// it with "<<".
func lookup(m *yaml.Node, key string) *yaml.Node {
	var merged []*yaml.Node
	for i := 0; i+1 < len(m.Content) && m.Kind == yaml.MappingNode; i += 2 {
		k, v := m.Content[i], resolve(m.Content[i+1])
		switch {
		case k.ShortTag() == "!!merge" && v.Kind == yaml.SequenceNode:
			for _, mv := range v.Content {
				merged = append(merged, resolve(mv))
			}
		case k.ShortTag() == "!!merge":
			merged = append(merged, v)
		case k.Value == key:
			return v
		}
	}
	for _, mm := range merged {
		for i := 0; i+1 < len(mm.Content) && mm.Kind == yaml.MappingNode; i += 2 {
			if k := mm.Content[i]; k.Value == key && k.ShortTag() != "!!merge" {
				return resolve(mm.Content[i+1])
			}
		}
	}
	return nil
}
