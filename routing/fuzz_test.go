package routing_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing"
)

// FuzzDecide decides requests with fuzzed key sources, path and method
// against the compiled example topology (keys from header, cookie, query
// and path; zone rules with method lists, a prefix and a pattern). A NUL
// byte in the header or cookie input splits it into several header lines.
// Decide must never panic, must fail only with its documented errors, and
// a decision must name a declared unit and agree with Lookup and the rules.
//
// The seed corpus is in testdata/fuzz/FuzzDecide.
func FuzzDecide(f *testing.F) {
	tp := exampleTopology(f)
	m := mustCompile(f, tp)
	units := tp.Units

	f.Fuzz(func(t *testing.T, uid, cookie, rawQuery, path, method string, local uint8) {
		h := http.Header{}
		if uid != "" {
			for _, v := range strings.Split(uid, "\x00") {
				h.Add(routing.DefaultKeyHeader, v)
			}
		}
		if cookie != "" {
			for _, v := range strings.Split(cookie, "\x00") {
				h.Add("Cookie", v)
			}
		}
		r := &routing.Request{Method: method, Path: path, RawQuery: rawQuery, Header: h}
		if int(local) < len(units) {
			r.LocalUnit = units[local].Name
		} else if local != 255 {
			r.LocalUnit = "not-a-unit"
		}

		d, err := m.Decide(r)
		d2, err2 := m.Decide(r)
		if d != d2 || (err == nil) != (err2 == nil) {
			t.Fatalf("Decide is not deterministic: %+v, %v then %+v, %v", d, err, d2, err2)
		}
		zone, write := m.Zone(r)
		if d.Zone != zone || d.Write != write {
			t.Fatalf("Decide zone %s write %v, Zone() says %s write %v", d.Zone, d.Write, zone, write)
		}
		if err != nil {
			checkDecideError(t, m, r, err)
			return
		}

		u, ok := m.Unit(d.Unit)
		if !ok {
			t.Fatalf("decision names unit %q, which is not declared", d.Unit)
		}
		if u.Region != d.Region {
			t.Fatalf("decision region %q, but unit %s is in %q", d.Region, d.Unit, u.Region)
		}
		switch {
		case d.LocalFallback:
			if d.Unit != r.LocalUnit || d.Shard != routing.GlobalShard || d.Key != "" {
				t.Fatalf("fallback decision %+v, want the local unit %q and no shard", d, r.LocalUnit)
			}
		case d.Zone == routing.KindRZone:
			if d.Shard < 0 || d.Shard >= m.Shards() {
				t.Fatalf("shard %d out of range 0..%d", d.Shard, m.Shards()-1)
			}
			o, err := m.Lookup(d.Shard)
			if err != nil {
				t.Fatalf("Lookup(%d): %v", d.Shard, err)
			}
			if o.Unit != d.Unit || o.Epoch != d.Epoch || o.State != d.State {
				t.Fatalf("decision %+v disagrees with Lookup %+v", d, o)
			}
			key, _, err := m.Key(r)
			if err != nil || key == "" || key != d.Key {
				t.Fatalf("decision key %q, Key() = %q, %v", d.Key, key, err)
			}
			if s, err := m.ShardOf(d.Key); err != nil || s != d.Shard {
				t.Fatalf("ShardOf(%q) = %d, %v; decision says %d", d.Key, s, err, d.Shard)
			}
		case d.Zone == routing.KindGZone:
			o, err := m.Lookup(routing.GlobalShard)
			if err != nil {
				t.Fatalf("Lookup(global): %v", err)
			}
			if d.Shard != routing.GlobalShard || d.Unit != o.Unit || d.Epoch != o.Epoch || d.Key != "" {
				t.Fatalf("gzone decision %+v, global owner %+v", d, o)
			}
		case d.Zone == routing.KindCZone:
			lu, ok := m.Unit(r.LocalUnit)
			if !ok {
				t.Fatalf("czone decision %+v for unknown local unit %q", d, r.LocalUnit)
			}
			if d.Shard != routing.GlobalShard || d.Region != lu.Region || d.Epoch != 0 || d.Key != "" {
				t.Fatalf("czone decision %+v from local unit %+v", d, lu)
			}
			if u.Kind != routing.KindCZone && d.Unit != lu.Name {
				t.Fatalf("czone decision %+v: neither a czone unit nor the local unit %s", d, lu.Name)
			}
		default:
			t.Fatalf("decision has zone %q", d.Zone)
		}
	})
}

// checkDecideError checks that err is one Decide documents.
func checkDecideError(t *testing.T, m *routing.ShardMap, r *routing.Request, err error) {
	t.Helper()
	var ke *routing.KeyError
	var ue *routing.UnknownShardError
	switch {
	case errors.As(err, &ke):
		if ke.Err == nil {
			t.Fatalf("KeyError without a cause: %v", err)
		}
		if errors.Is(err, routing.ErrNoKey) {
			if key, _, kerr := m.Key(r); kerr != nil || key != "" {
				t.Fatalf("ErrNoKey, but Key() = %q, %v", key, kerr)
			}
		}
		_ = err.Error() // must not panic, whatever the key
	case errors.As(err, &ue):
		t.Fatalf("UnknownShardError %v: the example topology has every shard and a global writer", err)
	case errors.Is(err, routing.ErrNoLocalUnit):
		if _, ok := m.Unit(r.LocalUnit); ok {
			t.Fatalf("ErrNoLocalUnit for declared local unit %q", r.LocalUnit)
		}
	default:
		t.Fatalf("Decide returned an undocumented error %T: %v", err, err)
	}
}
