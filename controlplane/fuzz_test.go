package controlplane

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/url"
	"slices"
	"testing"

	"github.com/cellmesh/cellmesh/controlplane/store"
)

// FuzzAPI sends any method, path and body to a real replica: it never
// answers 500, always answers JSON, and a call it refuses changes nothing.
func FuzzAPI(f *testing.F) {
	ca := newTestCA(f)
	r := start(f, ca, Config{ID: "cp-1", Topology: localTopology(f)})
	waitFor(f, "the topology", func() bool { return r.Store().Map() != nil && r.Store().IsLeader() })
	api := r.Addrs().API
	for _, s := range []struct {
		method byte
		path   string
		body   string
	}{
		{1, "shards/7/move", `{"to":"eu-west-1"}`},
		{1, "shards/global/move", `{"to":"eu-west-1","epoch":1}`},
		{1, "shards/99/move", `{"to":"us-east-2","epoch":18446744073709551615}`},
		{1, "shards/7/move", `{"to":"eu-west-1"}{"to":"x"}`},
		{0, "shards?unit=us-east-1&region=us-east", ``},
		{0, "shards/%2e%2e/move", ``},
		{1, "replicas", `{"id":"cp-2","raft":"127.0.0.1:1","api":"127.0.0.1:2","xds":"127.0.0.1:3"}`},
		{2, "replicas/cp-1", ``},
		{1, "internal/endpoints", `[{"registration":{"service":"echo","unit":"us-east-1","address":"127.0.0.1:1","transport":"quic"}}]`},
		{1, "internal/endpoints", `[{"purge":true,"registration":{"via":"cp-1"}}]`},
	} {
		f.Add(s.method, s.path, []byte(s.body))
	}
	methods := []string{"GET", "POST", "DELETE", "PUT", "PATCH"}
	client := &http.Client{}
	f.Fuzz(func(t *testing.T, method byte, path string, body []byte) {
		u, err := url.Parse("http://" + api + "/v1/" + path)
		if err != nil || u.Host != api {
			return
		}
		req, err := http.NewRequest(methods[int(method)%len(methods)], u.String(), bytes.NewReader(body))
		if err != nil {
			return
		}
		req.Header.Set("Authorization", "Bearer "+testToken)
		before := r.Store().State()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", req.Method, u, err)
		}
		defer resp.Body.Close()
		var v any
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			t.Fatalf("%s %s %q: %s is not JSON: %v", req.Method, u, body, resp.Status, err)
		}
		if resp.StatusCode >= 500 && resp.StatusCode != http.StatusServiceUnavailable {
			t.Fatalf("%s %s %q: %s %v", req.Method, u, body, resp.Status, v)
		}
		if resp.StatusCode != http.StatusOK {
			if after := r.Store().State(); !sameState(before, after) {
				t.Fatalf("%s %s %q was refused (%s) but changed the state: index %d -> %d", req.Method, u, body, resp.Status, before.Index, after.Index)
			}
		}
	})
}

// sameState reports whether the map, the endpoints and the replicas are
// the same in a and b: what an API call can change (the leader renews
// leases on its own meanwhile).
func sameState(a, b *store.State) bool {
	return a.Map == b.Map && slices.Equal(a.Endpoints, b.Endpoints) && slices.Equal(a.Replicas, b.Replicas)
}
