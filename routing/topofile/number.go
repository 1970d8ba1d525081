package topofile

import (
	"fmt"
	"math"
	"strconv"

	"go.yaml.in/yaml/v3"
)

// Int is a whole number in a file. A plain int field would take 2.5 as 2;
// Int refuses anything but a YAML integer (1, 0x10, 1_000). It encodes as a
// plain integer.
type Int int

// Uint is a whole number of 0 or more in a file, refused like Int.
type Uint uint64

// UnmarshalYAML refuses what is not a whole number that fits an int.
func (v *Int) UnmarshalYAML(n *yaml.Node) error {
	x, problem := wholeNumber[int](n)
	if problem != "" {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %s", n.Line, problem)}}
	}
	*v = Int(x)
	return nil
}

// UnmarshalYAML refuses what is not a whole number that fits a uint64.
func (v *Uint) UnmarshalYAML(n *yaml.Node) error {
	x, problem := wholeNumber[uint64](n)
	if problem != "" {
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %s", n.Line, problem)}}
	}
	*v = Uint(x)
	return nil
}

// wholeNumber reads n as a T. problem says why it cannot, without the line.
func wholeNumber[T int | uint64](n *yaml.Node) (v T, problem string) {
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
		return 0, "want a whole number, got " + describe(n)
	}
	if err := n.Decode(&v); err != nil {
		lo, hi := "0", strconv.FormatUint(math.MaxUint64, 10)
		if _, signed := any(v).(int); signed {
			lo, hi = strconv.Itoa(math.MinInt), strconv.Itoa(math.MaxInt)
		}
		return 0, fmt.Sprintf("want a whole number from %s to %s, got %s", lo, hi, describe(n))
	}
	return v, ""
}

// describe names a value for a message: a string is quoted, a long one cut.
func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	}
	s := n.Value
	if r := []rune(s); len(r) > 40 {
		s = string(r[:37]) + "..."
	}
	if n.ShortTag() == "!!str" {
		return strconv.Quote(s)
	}
	return s
}
