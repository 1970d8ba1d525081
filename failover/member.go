package failover

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"time"
)

// Roles of a member.
const (
	RoleSidecar      = "sidecar"
	RoleControlPlane = "controlplane"
)

// Meta is what a member tells the pool about itself. It travels in
// memberlist's node metadata (at most 512 bytes, JSON with short keys).
type Meta struct {
	// Role is RoleSidecar or RoleControlPlane.
	Role string `json:"r"`
	// Region and Unit locate the member; a control-plane replica has a
	// region and no unit.
	Region string `json:"g"`
	Unit   string `json:"u,omitempty"`
	// Service is the service beside a sidecar.
	Service string `json:"s,omitempty"`
	// Address is the sidecar's inbound address (ip:port) as it registers
	// it over xDS, or a replica's API address.
	Address string `json:"a,omitempty"`
	// Transport is the inbound transport (quic or h2).
	Transport string `json:"t,omitempty"`
	// Leaving is set by a member about to leave on purpose, so the others
	// tell its leave from a death.
	Leaving bool `json:"l,omitempty"`
}

// maxMetaSize is memberlist's limit on node metadata.
const maxMetaSize = 512

func (m Meta) validate() error {
	switch m.Role {
	case RoleSidecar:
		if m.Unit == "" || m.Service == "" {
			return fmt.Errorf("a sidecar member needs its unit and service")
		}
	case RoleControlPlane:
	default:
		return fmt.Errorf("member role %q: want %s or %s", m.Role, RoleSidecar, RoleControlPlane)
	}
	if m.Region == "" {
		return fmt.Errorf("a member needs its region")
	}
	if m.Address != "" {
		if _, err := netip.ParseAddrPort(m.Address); err != nil {
			return fmt.Errorf("member address %q: want ip:port", m.Address)
		}
	}
	return nil
}

func (m Meta) encode() ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	if len(b) > maxMetaSize {
		return nil, fmt.Errorf("member metadata is %d bytes, over memberlist's limit of %d: shorten the unit, service or region names", len(b), maxMetaSize)
	}
	return b, nil
}

func decodeMeta(b []byte) (Meta, error) {
	var m Meta
	if err := json.Unmarshal(b, &m); err != nil {
		return Meta{}, fmt.Errorf("member metadata: %w", err)
	}
	return m, m.validate()
}

// MemberState is what gossip says of a member.
type MemberState string

// Member states.
const (
	// MemberAlive answers probes.
	MemberAlive MemberState = "alive"
	// MemberDead did not refute in time.
	MemberDead MemberState = "dead"
	// MemberLeft left the pool on purpose (a clean stop).
	MemberLeft MemberState = "left"
)

// Member is one member of the pool as this process sees it.
type Member struct {
	Name  string      `json:"name"`
	Meta  Meta        `json:"meta"`
	State MemberState `json:"state"`
	// Gossip is the member's gossip address (ip:port).
	Gossip string `json:"gossip"`
	// Since is when this process saw the member enter State.
	Since time.Time `json:"since"`
}

// up reports whether the member counts for its unit's health.
func (m Member) up() bool { return m.State == MemberAlive }
