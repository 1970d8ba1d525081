package controlplane

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
)

// Three replicas formed by --join: sidecars register through any replica
// and every replica serves the same state; writes on a follower are
// forwarded to the leader; a sidecar cannot register as another unit;
// when the leader stops, the others elect a new one and keep taking
// writes; a closed stream deregisters its sidecar.
func TestThreeReplicasJoinRegisterForward(t *testing.T) {
	ca := newTestCA(t)
	r1 := start(t, ca, Config{ID: "cp-1", Region: "us-east", Topology: localTopology(t)})
	waitFor(t, "cp-1 to lead with the topology", func() bool { return r1.Store().IsLeader() && r1.Store().Map() != nil })
	r2 := start(t, ca, Config{ID: "cp-2", Region: "eu-west", Join: []string{r1.Addrs().API}})
	r3 := start(t, ca, Config{ID: "cp-3", Region: "ap-south", Join: []string{"http://" + r2.Addrs().API, r1.Addrs().API}})
	all := []*running{r1, r2, r3}
	waitFor(t, "three voters with their addresses recorded on every replica", func() bool {
		for _, r := range all {
			var m Members
			code, body := do(t, r.Addrs().API, "GET", "/v1/members", testToken, nil)
			if code != 200 || json.Unmarshal(body, &m) != nil || len(m.Replicas) != 3 || m.Leader == "" {
				return false
			}
			for _, rep := range m.Replicas {
				if !rep.Voter || rep.API == "" {
					return false
				}
			}
		}
		return true
	})

	// A sidecar registers through a follower; every replica records it and
	// serves it.
	echo := ca.store(t, "us-east", "us-east-1", "echo")
	meta := map[string]string{xdsapi.MetaService: "echo", xdsapi.MetaUnit: "us-east-1", xdsapi.MetaRegion: "us-east",
		xdsapi.MetaAddress: "127.0.0.1:15201", xdsapi.MetaTransport: "quic"}
	c := dialADS(t, r2.Addrs().XDS, echo, "us-east-1/echo/127.0.0.1:15201", meta)
	if resp, err := c.stream.Recv(); err != nil || resp.GetTypeUrl() != xdsapi.ShardMapType {
		t.Fatalf("first response: %v %v", resp, err)
	}
	registered := func(r *running) bool {
		for _, e := range r.Store().State().Endpoints {
			if e.Address == "127.0.0.1:15201" && e.Via == "cp-2" && e.Unit == "us-east-1" {
				return true
			}
		}
		return false
	}
	waitFor(t, "the registration on every replica, served at the same version", func() bool {
		v := r1.xds.Version()
		for _, r := range all {
			if !registered(r) || r.xds.Version() != v || r.xds.Version() != r.Store().State().Index {
				return false
			}
		}
		return true
	})

	// The unit of a registered sidecar holds a lease, renewed by the
	// leader: its grants come with rising seq.
	lease := func(after uint64) *cellmeshv1.Lease {
		t.Helper()
		for {
			resp, err := c.stream.Recv()
			if err != nil {
				t.Fatalf("waiting for a lease: %v", err)
			}
			if resp.GetTypeUrl() != xdsapi.LeaseType {
				continue
			}
			if err := c.stream.Send(&discovery.DiscoveryRequest{TypeUrl: xdsapi.LeaseType, ResourceNames: []string{"us-east-1"},
				VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
				t.Fatal(err)
			}
			if len(resp.GetResources()) != 1 {
				continue
			}
			var l cellmeshv1.Lease
			if err := resp.GetResources()[0].UnmarshalTo(&l); err != nil {
				t.Fatal(err)
			}
			if l.GetSeq() > after {
				return &l
			}
		}
	}
	if err := c.stream.Send(&discovery.DiscoveryRequest{TypeUrl: xdsapi.LeaseType, ResourceNames: []string{"us-east-1"}}); err != nil {
		t.Fatal(err)
	}
	l1 := lease(0)
	if l1.GetUnit() != "us-east-1" || l1.GetName() != "us-east-1" || l1.GetTtlMillis() != uint64(DefaultLeaseTTL/time.Millisecond) {
		t.Fatalf("lease %v", l1)
	}
	if l2 := lease(l1.GetSeq()); l2.GetSeq() <= l1.GetSeq() {
		t.Fatalf("renewal %v after %v", l2, l1)
	}

	// A sidecar whose certificate says us-east-1 cannot register as eu-west-1.
	bad := map[string]string{xdsapi.MetaService: "echo", xdsapi.MetaUnit: "eu-west-1", xdsapi.MetaRegion: "eu-west",
		xdsapi.MetaAddress: "127.0.0.1:15999", xdsapi.MetaTransport: "quic"}
	imp := dialADS(t, r3.Addrs().XDS, echo, "impostor", bad)
	if _, err := imp.stream.Recv(); err == nil || !strings.Contains(err.Error(), "registers only as itself") {
		t.Fatalf("impostor's stream: %v", err)
	}
	// A write on a follower is forwarded to the leader.
	leader := func(among []*running) *running {
		for _, r := range among {
			if r.Store().IsLeader() {
				return r
			}
		}
		return nil
	}
	var follower *running
	for _, r := range all {
		if r != leader(all) && r != r2 {
			follower = r
		}
	}
	move := func(via *running, shard, to string) MoveResult {
		t.Helper()
		req, _ := http.NewRequest("POST", "http://"+via.Addrs().API+"/v1/shards/"+shard+"/move", strings.NewReader(`{"to":"`+to+`"}`))
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var res MoveResult
		if resp.StatusCode != 200 || json.NewDecoder(resp.Body).Decode(&res) != nil {
			b, _ := io.ReadAll(resp.Body)
			t.Fatalf("move via %s: %s %s", via.cfg.ID, resp.Status, b)
		}
		if l := resp.Header.Get(leaderHeader); l == via.cfg.ID || l == "" {
			t.Fatalf("move via follower %s answered by %q", via.cfg.ID, l)
		}
		return res
	}
	res := move(follower, "3", "eu-west-2")
	waitFor(t, "the move on every replica", func() bool {
		for _, r := range all {
			if o, _ := r.Store().Map().Lookup(3); o.Unit != "eu-west-2" || o.Epoch != res.Epoch {
				return false
			}
		}
		return true
	})

	// The leader stops; the two others elect a new one and take writes.
	old := leader(all)
	old.halt()
	var rest []*running
	for _, r := range all {
		if r != old {
			rest = append(rest, r)
		}
	}
	waitFor(t, "a new leader", func() bool { return leader(rest) != nil })
	for _, r := range rest {
		if r != leader(rest) {
			follower = r
		}
	}
	var after MoveResult
	waitFor(t, "a write through the survivors", func() bool {
		code, body := do(t, follower.Addrs().API, "POST", "/v1/shards/4/move", testToken, []byte(`{"to":"eu-west-1"}`))
		return code == 200 && json.Unmarshal(body, &after) == nil
	})
	if after.Epoch != 2 {
		t.Fatalf("move after the leader stopped: %+v", after)
	}

	// The stopped replica is removed from the configuration through the
	// API (on a follower: forwarded).
	if code, body := do(t, follower.Addrs().API, "DELETE", "/v1/replicas/"+old.cfg.ID, testToken, nil); code != 200 {
		t.Fatalf("remove %s: %d %s", old.cfg.ID, code, body)
	}
	waitFor(t, "two voters", func() bool {
		var m Members
		getJSON(t, follower.Addrs().API, "/v1/members", &m)
		if len(m.Replicas) != 2 {
			return false
		}
		for _, rep := range m.Replicas {
			if rep.ID == old.cfg.ID {
				return false
			}
		}
		return true
	})

	// The sidecar's stream ends: it is deregistered, unless its replica
	// was the one stopped (then its record waits for the sidecar's next
	// registration or that replica's restart).
	if old != r2 {
		c.close()
		waitFor(t, "the deregistration", func() bool { return !registered(rest[0]) && !registered(rest[1]) })
	}
}
