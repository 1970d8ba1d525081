package topofile_test

import (
	"errors"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/cellmesh/cellmesh/routing/topofile"
	gocmp "github.com/google/go-cmp/cmp"
)

// FuzzParse parses fuzzed files. Parse must never panic; a file that
// parses is validated; a valid topology must compile, and Encode then Parse
// must give it back, with Encode stable from then on.
//
// The seed corpus is in testdata/fuzz/FuzzParse; it holds the example
// topology.
func FuzzParse(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 1<<16 {
			t.Skip("larger than any seed needs")
		}
		tp, err := topofile.Parse(data)
		if err != nil {
			if tp != nil {
				t.Fatalf("Parse returned a topology with error %v", err)
			}
			return
		}
		err = tp.Validate()
		if err != nil {
			var ve *routing.ValidationError
			if !errors.As(err, &ve) || len(ve.Problems) == 0 {
				t.Fatalf("Validate error %T %v, want a *ValidationError with problems", err, err)
			}
			return
		}
		m, err := routing.Compile(tp)
		if err != nil {
			t.Fatalf("Compile of a valid topology: %v", err)
		}
		if diff := gocmp.Diff(tp, m.Topology()); diff != "" {
			t.Fatalf("compiled topology differs (-parsed +compiled):\n%s", diff)
		}

		enc, err := topofile.Encode(tp)
		if err != nil {
			t.Fatalf("Encode: %v", err)
		}
		back, err := topofile.Parse(enc)
		if err != nil {
			t.Fatalf("Parse(Encode(t)): %v\nencoded:\n%s", err, enc)
		}
		if diff := gocmp.Diff(tp, back, sameTopology); diff != "" {
			t.Fatalf("Parse(Encode(t)) differs (-t +back):\n%s\nencoded:\n%s", diff, enc)
		}
		again, err := topofile.Encode(back)
		if err != nil {
			t.Fatalf("Encode(back): %v", err)
		}
		if string(again) != string(enc) {
			t.Fatalf("Encode is not stable:\n%s\n---\n%s", enc, again)
		}
	})
}
