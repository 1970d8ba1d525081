package controlplane

import (
	"encoding/json"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/routing"
)

// Drills through the API. A dry run shows the plan and its rules and
// changes nothing; bad bodies and a drill that breaks a safety rule are
// refused and change nothing; an evacuation moves every shard of the
// region out, one planned handoff after another, and its report (kept by
// the control plane) says so; a restore moves them back; an abort stops
// after the move in progress, every shard keeping one serving primary.
func TestDrills(t *testing.T) {
	ca := newTestCA(t)
	topo := localTopology(t)
	topo.Safety.MinServingUnits = 3 // a region's evacuation breaks it, a unit's does not
	r := start(t, ca, Config{ID: "cp-1", Topology: topo})
	api := r.Addrs().API
	waitFor(t, "the topology", func() bool { return r.Store().Map() != nil && r.Store().IsLeader() })
	// The drills pause before a move when the test says so.
	gate := make(chan int)
	var holdAt atomic.Int32 // the move to hold before; -1: none
	holdAt.Store(-1)
	r.drills.beforeMove = func(i int) {
		if holdAt.CompareAndSwap(int32(i), -1) {
			gate <- i
			<-gate
		}
	}
	on := func(unit string) int {
		n := 0
		for _, a := range r.Store().Map().Topology().Assignments {
			if a.Primary == unit {
				n++
			}
		}
		return n
	}
	call := func(method, path, body string) (int, []byte, string) {
		t.Helper()
		code, out := do(t, api, method, path, testToken, []byte(body))
		var e struct{ Error string }
		_ = json.Unmarshal(out, &e)
		return code, out, e.Error
	}
	post := func(path, body string, want int, into any) {
		t.Helper()
		code, out, msg := call("POST", path, body)
		if code != want {
			t.Fatalf("POST %s %s: %d %s %s, want %d", path, body, code, msg, out, want)
		}
		if into != nil {
			if err := json.Unmarshal(out, into); err != nil {
				t.Fatal(err)
			}
		}
	}
	report := func(id string) store.Drill {
		var d store.Drill
		getJSON(t, api, "/v1/drills/"+id, &d)
		return d
	}
	waitDrill := func(id string) store.Drill {
		t.Helper()
		waitFor(t, "drill "+id+" to end", func() bool { return report(id).Phase != "running" })
		return report(id)
	}
	n := on("us-east-1")

	// Refused, and dry runs: nothing changes.
	before := r.Store().State()
	for _, c := range []struct {
		body string
		code int
		says string
	}{
		{`{"kind":"evacuate"}`, 400, `one target`},
		{`{"kind":"evacuate","region":"us-east","unit":"us-east-1"}`, 400, `one target`},
		{`{"kind":"melt","region":"us-east"}`, 400, `drill kind "melt"`},
		{`{"kind":"evacuate","region":"mars"}`, 400, `region "mars" is not in topology`},
		{`{"kind":"evacuate","unit":"mars-1"}`, 400, `unit "mars-1" is not in topology`},
		{`{"kind":"evacuate","region":"us-east","x":1}`, 400, `unknown field`},
		{`{"kind":"restore","unit":"us-east-1"}`, 409, `nothing to restore`},
		{`{"kind":"evacuate","region":"us-east"}`, 409, `min-serving-units`},
	} {
		if code, _, msg := call("POST", "/v1/drills", c.body); code != c.code || !strings.Contains(msg, c.says) {
			t.Errorf("POST /v1/drills %s: %d %q, want %d saying %q", c.body, code, msg, c.code, c.says)
		}
	}
	var plan DrillPlan
	post("/v1/drills", `{"kind":"evacuate","region":"us-east","dry_run":true}`, 200, &plan)
	broken := ""
	for _, rr := range plan.Rules {
		if !rr.OK {
			broken += rr.Rule
		}
	}
	if !plan.Refused || broken != "min-serving-units" || len(plan.Moves) != 50 {
		t.Fatalf("dry run of a refused drill: refused %v, broken %q, %d moves", plan.Refused, broken, len(plan.Moves))
	}
	post("/v1/drills", `{"kind":"evacuate","unit":"us-east-1","dry_run":true}`, 200, &plan)
	if plan.Refused || len(plan.Moves) != n {
		t.Fatalf("dry run: refused %v, %d moves, want %d", plan.Refused, len(plan.Moves), n)
	}
	if after := r.Store().State(); !sameState(before, after) || len(after.Drills) != 0 {
		t.Fatalf("refused calls or dry runs changed the state: index %d -> %d", before.Index, after.Index)
	}

	// An evacuation, held before its first move: one drill at a time.
	holdAt.Store(0)
	var d store.Drill
	post("/v1/drills", `{"kind":"evacuate","unit":"us-east-1"}`, 200, &d)
	<-gate
	if code, _, msg := call("POST", "/v1/drills", `{"kind":"evacuate","unit":"eu-west-1"}`); code != http.StatusConflict || !strings.Contains(msg, "is running") {
		t.Fatalf("a second drill while one runs: %d %q", code, msg)
	}
	gate <- 0
	d = waitDrill(d.ID)
	if d.Phase != "done" || d.Moved != n || d.Total != n || on("us-east-1") != 0 {
		t.Fatalf("evacuation: phase %s (%s), %d of %d moved, %d primaries left on us-east-1", d.Phase, d.Reason, d.Moved, d.Total, on("us-east-1"))
	}
	for _, s := range d.Shards {
		if s.Phase != "done" || !s.RPOOK || s.Epoch != 2 || s.From != "us-east-1" {
			t.Fatalf("shard in the report: %+v", s)
		}
	}
	if len(d.Events) != n+2 {
		t.Fatalf("the timeline has %d events for %d moves, want a start, the moves and an end", len(d.Events), n)
	}

	// The restore brings them back.
	var rs store.Drill
	post("/v1/drills", `{"kind":"restore","unit":"us-east-1"}`, 200, &rs)
	if rs = waitDrill(rs.ID); rs.Phase != "done" || on("us-east-1") != n {
		t.Fatalf("restore: phase %s (%s), %d primaries on us-east-1, want %d", rs.Phase, rs.Reason, on("us-east-1"), n)
	}

	// An abort while the second move waits: the first stays moved, the
	// rest are skipped, every shard has one serving primary.
	holdAt.Store(1)
	var ab store.Drill
	post("/v1/drills", `{"kind":"evacuate","unit":"us-east-1"}`, 200, &ab)
	<-gate
	post("/v1/drills/"+ab.ID+"/abort", ``, 200, nil)
	gate <- 1
	ab = waitDrill(ab.ID)
	if ab.Phase != "aborted" || ab.Moved != 1 || ab.Shards[0].Phase != "done" || ab.Shards[1].Phase != "skipped" || on("us-east-1") != n-1 {
		t.Fatalf("aborted drill: phase %s, %d of %d moved, %d left on us-east-1", ab.Phase, ab.Moved, ab.Total, on("us-east-1"))
	}
	for _, a := range r.Store().Map().Topology().Assignments {
		if a.Primary == "" || a.State != routing.StateServing {
			t.Fatalf("after the abort, shard %d: primary %q, state %s", a.Shard, a.Primary, a.State)
		}
	}
	if code, _, _ := call("POST", "/v1/drills/"+ab.ID+"/abort", ``); code != http.StatusConflict {
		t.Fatalf("abort of an ended drill: %d", code)
	}
	if code, _, _ := call("POST", "/v1/drills/nope/abort", ``); code != http.StatusNotFound {
		t.Fatalf("abort of an unknown drill: %d", code)
	}
	var list struct{ Drills []store.Drill }
	getJSON(t, api, "/v1/drills", &list)
	if len(list.Drills) != 3 {
		t.Fatalf("%d drills listed, want 3", len(list.Drills))
	}
}
