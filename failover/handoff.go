package failover

import "fmt"

// Report is one shard's replication watermarks on one unit, as a stateful
// service answers GET /.well-known/cellmesh/replication (the handoff
// contract).
type Report struct {
	Shard     int    `json:"shard"`
	Role      string `json:"role"`
	Epoch     uint64 `json:"epoch"`
	Committed uint64 `json:"committed"`
	Received  uint64 `json:"received"`
	Applied   uint64 `json:"applied"`
	Sync      bool   `json:"sync"`
}

// Replication is a service's whole answer.
type Replication struct {
	Shards []Report `json:"shards"`
}

// Shard returns the report of one shard, false when the service has none.
func (r *Replication) Shard(shard int) (Report, bool) {
	for _, s := range r.Shards {
		if s.Shard == shard {
			return s, true
		}
	}
	return Report{}, false
}

// BlockedError says why a handoff cannot prove that no acknowledged write
// would be lost; Gap is how many entries the standby lacks, as far as is
// known (0 when unknown).
type BlockedError struct {
	Reason string
	Gap    uint64
}

func (e *BlockedError) Error() string { return "handoff blocked: " + e.Reason }

// CheckPlanned is the planned handoff's check, once the shard is draining:
// nothing in flight at the primary (every entry it holds is committed),
// and the standby has applied everything the primary committed, at the
// shard's epoch.
func CheckPlanned(epoch uint64, primary, standby Report) error {
	switch {
	case primary.Epoch > epoch || standby.Epoch > epoch:
		return &BlockedError{Reason: fmt.Sprintf("the service has seen epoch %d/%d, newer than the map's %d", primary.Epoch, standby.Epoch, epoch)}
	case primary.Received > primary.Committed:
		return &BlockedError{Reason: fmt.Sprintf("the primary has %d writes in flight (received %d, committed %d)", primary.Received-primary.Committed, primary.Received, primary.Committed)}
	case standby.Applied < primary.Committed:
		return &BlockedError{Reason: fmt.Sprintf("the standby has applied %d of the %d writes the primary committed", standby.Applied, primary.Committed), Gap: primary.Committed - standby.Applied}
	}
	return nil
}

// CheckUnplanned is the unplanned failover's check on the standby's
// report: it is the standby of the shard at the lost primary's epoch, it
// says it is in sync with that primary and has applied all it received.
// lastPrimary, when known, is the primary's last report: a standby behind
// what it committed is not in sync, whatever it says. A standby with no
// record of the shard passes only when the primary is known to have
// committed nothing (a wiped standby looks the same as a fresh one).
func CheckUnplanned(epoch uint64, standby Report, lastPrimary *Report) error {
	var gap uint64
	if lastPrimary != nil && lastPrimary.Committed > standby.Applied {
		gap = lastPrimary.Committed - standby.Applied
	}
	if standby.Role == "" && standby.Received == 0 {
		if lastPrimary != nil && lastPrimary.Committed == 0 {
			return nil // the shard never held data: nothing to lose
		}
		return &BlockedError{Reason: "the standby holds no record of the shard and the primary's last watermark is unknown", Gap: gap}
	}
	switch {
	case standby.Epoch != epoch || standby.Role != "standby":
		return &BlockedError{Reason: fmt.Sprintf("the standby is %s at epoch %d, not the standby at the lost primary's epoch %d", standby.Role, standby.Epoch, epoch), Gap: gap}
	case !standby.Sync:
		return &BlockedError{Reason: fmt.Sprintf("the standby's last report says it is not in sync (received %d, the primary's committed %d as it knew it)", standby.Received, standby.Committed), Gap: gap}
	case standby.Applied != standby.Received:
		return &BlockedError{Reason: fmt.Sprintf("the standby has applied %d of the %d writes it received", standby.Applied, standby.Received), Gap: max(gap, standby.Received-standby.Applied)}
	case gap > 0:
		return &BlockedError{Reason: fmt.Sprintf("the primary's last report committed %d writes, the standby applied %d", lastPrimary.Committed, standby.Applied), Gap: gap}
	}
	return nil
}
