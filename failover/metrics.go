package failover

import (
	"github.com/prometheus/client_golang/prometheus"
)

// healthCollector exports a Health's last view.
type healthCollector struct {
	h                      *Health
	members, units, region *prometheus.Desc
}

// Collector returns the Prometheus collector of h: members by state,
// unit and region states (1 for the current state), per region and unit.
func (h *Health) Collector() prometheus.Collector {
	return &healthCollector{
		h: h,
		members: prometheus.NewDesc("cellmesh_members",
			"Gossip members as this process sees them, by region, unit (empty for control-plane replicas) and state (alive, dead, left, held: back after a death and damped).",
			[]string{"region", "unit", "state"}, nil),
		units: prometheus.NewDesc("cellmesh_unit_state",
			"A unit's health from gossip: 1 for its current state (up, degraded, suspect, down, unknown), 0 for the others.",
			[]string{"region", "unit", "state"}, nil),
		region: prometheus.NewDesc("cellmesh_region_state",
			"A region's health from gossip: 1 for its current state (up, degraded, down, unknown), 0 for the others.",
			[]string{"region", "state"}, nil),
	}
}

func (c *healthCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.members
	ch <- c.units
	ch <- c.region
}

var unitStates = []UnitState{StateUp, StateDegraded, StateSuspect, StateDown, StateUnknown}

func (c *healthCollector) Collect(ch chan<- prometheus.Metric) {
	v := c.h.View()
	type key struct{ region, unit, state string }
	counts := map[key]int{}
	for _, m := range v.Members {
		st := string(m.State)
		if !m.HeldUntil.IsZero() {
			st = "held"
		}
		counts[key{m.Meta.Region, m.Meta.Unit, st}]++
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(c.members, prometheus.GaugeValue, float64(n), k.region, k.unit, k.state)
	}
	for _, u := range v.Units {
		for _, s := range unitStates {
			ch <- prometheus.MustNewConstMetric(c.units, prometheus.GaugeValue, b2f(u.State == s), u.Region, u.Unit, string(s))
		}
	}
	for _, r := range v.Regions {
		for _, s := range unitStates {
			if s == StateSuspect {
				continue
			}
			ch <- prometheus.MustNewConstMetric(c.region, prometheus.GaugeValue, b2f(r.State == s), r.Region, string(s))
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
