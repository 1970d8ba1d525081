package main

import (
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// gossipJSON is what the gossip test reads of GET /v1/members.
type gossipJSON struct {
	Endpoints []struct {
		Unit, Address string
		Down          bool
	}
	Leases []struct {
		Unit   string
		EndsAt time.Time `json:"ends_at"`
	}
	Gossip struct {
		Enabled bool
		Members []struct {
			Name, State string
			Meta        struct {
				Unit string `json:"u"`
			}
		}
		Units []struct{ Unit, State string }
	}
}

func (cm *cpMesh) gossipView(r *cpProc) gossipJSON {
	var g gossipJSON
	cm.api(r, "GET", "/v1/members", "", &g)
	return g
}

func (g gossipJSON) unit(name string) string {
	for _, u := range g.Gossip.Units {
		if u.Unit == name {
			return u.State
		}
	}
	return ""
}

// Processes with gossip: a sidecar paused with SIGSTOP (alive to the
// kernel, its xDS stream open, silent to gossip) is found dead, leaves
// every other sidecar's endpoints, and its unit loses its lease; resumed,
// it comes back after its hold-down. A sidecar stopped with SIGTERM leaves
// the pool: the others see it left, not dead.
func TestGossipProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("starts 11 processes")
	}
	cm := startCPMesh(t, true)
	r1 := cm.replicas[0]
	cm.waitUntil("every unit up in gossip", 30*time.Second, func() bool {
		g := cm.gossipView(cm.leader(cm.replicas...))
		for _, p := range cm.units {
			if g.unit(p.unit) != "up" {
				return false
			}
		}
		return g.Gossip.Enabled && len(g.Gossip.Members) == len(cm.units)+len(cm.replicas)
	})
	for _, p := range cm.units {
		cm.waitUntil(p.unit+"'s lease", 30*time.Second, func() bool {
			return metricValue(t, metricsOf(t, p.admin), "cellmesh_lease_remaining_seconds") > 0
		})
	}
	out, code := cm.ctl(r1, "status")
	if code != 0 || !regexp.MustCompile(`(?m)^us-east-2\s+us-east\s+rzone\s+up\s+25\s+1\s+[0-9.]+m?s\s*$`).MatchString(out) ||
		!strings.Contains(out, "7 members (7 alive)") {
		t.Fatalf("cellmesh status (exit %d) does not show us-east-2 up and 7 alive members:\n%s", code, out)
	}

	// Pause us-east-2's sidecar.
	ue2 := cm.by["us-east-2"]
	paused := time.Now()
	if err := ue2.sidecar.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			ue2.sidecar.Process.Signal(syscall.SIGCONT)
		}
	}()
	cm.waitUntil("us-east-2 out of every other sidecar's endpoints", 30*time.Second, func() bool {
		for _, p := range cm.units {
			if p != ue2 && endpointUnits(p.admin) != len(cm.units)-1 {
				return false
			}
		}
		return true
	})
	t.Logf("paused sidecar out of every other sidecar's endpoints %s after SIGSTOP", time.Since(paused).Round(time.Millisecond))
	cm.waitUntil("us-east-2 down and its lease ended", 30*time.Second, func() bool {
		g := cm.gossipView(cm.leader(cm.replicas...))
		for _, l := range g.Leases {
			if l.Unit == "us-east-2" && time.Now().Before(l.EndsAt) {
				return false
			}
		}
		return g.unit("us-east-2") == "down"
	})
	t.Logf("us-east-2 down and its lease ended %s after SIGSTOP", time.Since(paused).Round(time.Millisecond))
	var evs struct {
		Events []struct {
			Kind, Name, To string
			At             time.Time
		}
	}
	cm.api(cm.leader(cm.replicas...), "GET", "/v1/events", "", &evs)
	for _, e := range evs.Events {
		if e.At.After(paused) {
			t.Logf("event %s after SIGSTOP: %s %s -> %s", e.At.Sub(paused).Round(time.Millisecond), e.Kind, e.Name, e.To)
		}
	}
	out, _ = cm.ctl(r1, "status")
	if !regexp.MustCompile(`(?m)^us-east-2\s+us-east\s+rzone\s+down\s+25\s+1 \(1 down\)\s+ended\s*$`).MatchString(out) {
		t.Fatalf("cellmesh status does not show us-east-2 down with its sidecar down and its lease ended:\n%s", out)
	}
	// The other units keep theirs.
	if g := cm.gossipView(r1); g.unit("us-east-1") != "up" || g.unit("eu-west-1") != "up" {
		t.Fatalf("other units: %+v", g.Gossip.Units)
	}

	// Resumed, it refutes its death and, after its hold-down, is back.
	ue2.sidecar.Process.Signal(syscall.SIGCONT)
	resumed = true
	cm.waitUntil("us-east-2 back in every sidecar's endpoints", 30*time.Second, func() bool {
		for _, p := range cm.units {
			if endpointUnits(p.admin) != len(cm.units) {
				return false
			}
		}
		return cm.gossipView(r1).unit("us-east-2") == "up"
	})
	cm.waitUntil("us-east-2's lease again", 30*time.Second, func() bool {
		return metricValue(t, metricsOf(t, ue2.admin), "cellmesh_lease_remaining_seconds") > 0
	})

	// A clean stop is a leave.
	ew2 := cm.by["eu-west-2"]
	ew2.sidecar.Process.Signal(syscall.SIGTERM)
	<-ew2.sidecarDone
	cm.waitUntil("eu-west-2's sidecar seen left", 30*time.Second, func() bool {
		for _, m := range cm.gossipView(r1).Gossip.Members {
			if m.Meta.Unit == "eu-west-2" {
				return m.State == "left"
			}
		}
		return false
	})
	// Its registration goes (it deregistered), or while it stays it is
	// served draining (peers keep their connections to it): never down.
	cm.waitUntil("eu-west-2's registration gone or draining", 30*time.Second, func() bool {
		var regs struct {
			Endpoints []struct {
				Unit           string
				Down, Draining bool
			}
		}
		cm.api(cm.leader(cm.replicas...), "GET", "/v1/members", "", &regs)
		for _, e := range regs.Endpoints {
			if e.Unit == "eu-west-2" {
				if e.Down {
					t.Fatal("eu-west-2's endpoint marked down after a clean stop: peers would cut its requests in flight")
				}
				return e.Draining
			}
		}
		return true
	})
	var ev struct {
		Events []struct{ Kind, Name, Unit, To string }
	}
	cm.api(r1, "GET", "/v1/events", "", &ev)
	var deaths []string
	for _, e := range ev.Events {
		if e.Kind == "member" && e.To == "dead" {
			deaths = append(deaths, e.Name)
		}
	}
	if len(deaths) != 1 || !strings.Contains(deaths[0], "us-east-2") {
		t.Fatalf("deaths in the event log: %v, want us-east-2's sidecar once", deaths)
	}
}
