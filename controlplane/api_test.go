package controlplane

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/cellmesh/cellmesh/routing/topofile"
)

// Every bad call is refused with a JSON error naming the problem and
// changes nothing; a good move commits epoch+1 and is in the operator log.
func TestAPIRefusesBadCallsAndMoves(t *testing.T) {
	ca := newTestCA(t)
	r := start(t, ca, Config{ID: "cp-1", Topology: localTopology(t)})
	api := r.Addrs().API
	waitFor(t, "the topology", func() bool { return r.Store().Map() != nil && r.Store().IsLeader() })

	var s7 Shard
	getJSON(t, api, "/v1/shards/7", &s7)
	other := "eu-west-1"
	if s7.Unit == other {
		other = "us-east-1"
	}
	before := r.Store().State()
	big := `{"to":"` + strings.Repeat("x", maxBody) + `"}`
	for _, c := range []struct {
		method, path, token, body string
		code                      int
		says                      string
	}{
		{"GET", "/v1/shards", "", "", 401, "missing bearer token"},
		{"GET", "/v1/shards", "wrong", "", 401, "wrong bearer token"},
		{"POST", "/v1/shards/7/move", "", `{"to":"` + other + `"}`, 401, "bearer"},
		{"POST", "/v1/shards/7/move", testToken, ``, 400, "empty body"},
		{"POST", "/v1/shards/7/move", testToken, `{"to":`, 400, "not the JSON"},
		{"POST", "/v1/shards/7/move", testToken, `[1,2]`, 400, "not the JSON"},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"` + other + `"} {}`, 400, "more than one"},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"` + other + `","why":1}`, 400, `unknown field "why"`},
		{"POST", "/v1/shards/7/move", testToken, `{}`, 400, `"to" is required`},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"mars-1"}`, 400, `unit "mars-1" is not in topology`},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"` + other + `","epoch":99}`, 409, "is at epoch 1, not 99"},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"` + s7.Unit + `"}`, 409, "already on " + s7.Unit},
		{"POST", "/v1/shards/7/move", testToken, `{"to":"` + other + `","epoch":-1}`, 400, "not the JSON"},
		{"POST", "/v1/shards/7/move", testToken, big, 413, "larger than"},
		{"POST", "/v1/shards/abc/move", testToken, `{"to":"` + other + `"}`, 400, `shard "abc"`},
		{"POST", "/v1/shards/100/move", testToken, `{"to":"` + other + `"}`, 404, "100"},
		{"POST", "/v1/shards/-7/move", testToken, `{"to":"` + other + `"}`, 404, "-7"},
		{"GET", "/v1/shards/7/move", testToken, ``, 405, "takes POST"},
		{"DELETE", "/v1/shards", testToken, ``, 405, "takes GET"},
		{"GET", "/v1/shards?unit=mars-1", testToken, ``, 404, "mars-1"},
		{"GET", "/v1/shards?region=mars", testToken, ``, 404, "mars"},
		{"GET", "/v1/shards?state=on-fire", testToken, ``, 400, "on-fire"},
		{"GET", "/v1/shards?owner=x", testToken, ``, 400, "unknown query parameter"},
		{"GET", "/v1/nothing", testToken, ``, 404, "no API at"},
		{"POST", "/v1/replicas", testToken, `{"id":"../x","raft":"a:1","api":"a:2","xds":"a:3"}`, 400, "id"},
		{"POST", "/v1/replicas", testToken, `{"id":"cp-9","raft":"nope","api":"a:2","xds":"a:3"}`, 400, "raft address"},
		{"DELETE", "/v1/replicas/cp-9", testToken, ``, 404, "not in the raft configuration"},
		{"DELETE", "/v1/replicas/cp-1", testToken, ``, 409, "last voter"},
		{"POST", "/v1/internal/endpoints", testToken, `{"x":1}`, 400, "not the JSON"},
	} {
		code, body := do(t, api, c.method, c.path, c.token, []byte(c.body))
		var e struct{ Error string }
		if err := json.Unmarshal(body, &e); err != nil {
			t.Errorf("%s %s %.40q: answer is not JSON: %s", c.method, c.path, c.body, body)
			continue
		}
		if code != c.code || !strings.Contains(e.Error, c.says) {
			t.Errorf("%s %s %.40q: %d %q, want %d saying %q", c.method, c.path, c.body, code, e.Error, c.code, c.says)
		}
	}
	if after := r.Store().State(); !sameState(before, after) {
		t.Fatalf("refused calls changed the state: index %d -> %d", before.Index, after.Index)
	}

	code, body := do(t, api, "POST", "/v1/shards/7/move", testToken, []byte(`{"to":"`+other+`","epoch":1}`))
	if code != http.StatusOK {
		t.Fatalf("move: %d %s", code, body)
	}
	var res MoveResult
	if err := json.Unmarshal(body, &res); err != nil {
		t.Fatal(err)
	}
	if res.From != s7.Unit || res.To != other || res.Epoch != 2 || res.Version != 2 || r.xds.Version() < res.Index {
		t.Fatalf("move answered %+v (published %d)", res, r.xds.Version())
	}
	var now Shard
	getJSON(t, api, "/v1/shards/7", &now)
	if now.Unit != other || now.Epoch != 2 || now.Standbys[0] != s7.Unit {
		t.Fatalf("after the move shard 7 is %+v", now)
	}
	var shards Shards
	getJSON(t, api, "/v1/shards?unit="+other, &shards)
	found := false
	for _, s := range shards.Shards {
		found = found || s.Shard == 7
		if s.Unit != other {
			t.Fatalf("filter unit=%s returned %+v", other, s)
		}
	}
	if !found {
		t.Fatalf("shard 7 missing from unit %s's shards", other)
	}
	var acts struct{ Actions []struct{ Who, What string } }
	getJSON(t, api, "/v1/actions", &acts)
	last := acts.Actions[len(acts.Actions)-1]
	if last.Who != "api" || !strings.Contains(last.What, fmt.Sprintf("move shard 7 from %s to %s, epoch 2", s7.Unit, other)) {
		t.Fatalf("operator log ends with %+v", last)
	}
	var topo map[string]any
	getJSON(t, api, "/v1/topology", &topo)
	if topo["version"] != "2" {
		t.Fatalf("GET /v1/topology version %v, want \"2\"", topo["version"])
	}

	// A topology is committed only as a valid successor.
	file := localTopology(t)
	file.Version = 3 // but shard 7 is back on its old primary at epoch 1
	stale, err := topofile.Encode(file)
	if err != nil {
		t.Fatal(err)
	}
	next := r.Store().Map().Topology()
	next.Version = 3
	good, err := topofile.Encode(next)
	if err != nil {
		t.Fatal(err)
	}
	before = r.Store().State()
	for _, c := range []struct {
		body string
		code int
		says string
	}{
		{"version: [", 400, "topology"},
		{"", 400, "topology"},
		{string(stale), 409, "epoch"},
	} {
		code, body := do(t, api, "PUT", "/v1/topology", testToken, []byte(c.body))
		if code != c.code || !strings.Contains(string(body), c.says) {
			t.Errorf("PUT /v1/topology %.30q: %d %s, want %d saying %q", c.body, code, body, c.code, c.says)
		}
	}
	if after := r.Store().State(); !sameState(before, after) {
		t.Fatalf("refused topologies changed the state: index %d -> %d", before.Index, after.Index)
	}
	if code, body := do(t, api, "PUT", "/v1/topology", testToken, good); code != 200 || r.Store().Map().Version() != 3 {
		t.Fatalf("PUT a successor: %d %s", code, body)
	}
}

// A replica refuses to start without a token (unless --insecure-dev) or
// with a certificate that is not a control plane's.
func TestOpenRefusesUnsafeConfig(t *testing.T) {
	ca := newTestCA(t)
	cfg := Config{ID: "cp-1", DataDir: t.TempDir(), Raft: freeAddr(t), API: freeAddr(t), XDS: freeAddr(t),
		TLS: ca.store(t, "us-east", "cp-1", "echo")}
	_, err := Open(cfg)
	if err == nil || !strings.Contains(err.Error(), "no API token") || !strings.Contains(err.Error(), "needs one for service "+"cellmesh-controlplane") {
		t.Fatalf("Open without token and with a service certificate: %v", err)
	}
}
