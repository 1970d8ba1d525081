package failover

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/memberlist"
)

// A Profile names a set of gossip timings, each built on one of
// memberlist's presets.
type Profile string

// Profiles.
const (
	// ProfileLAN is memberlist.DefaultLANConfig: a probe a second, a dead
	// member declared in about 5 s in a pool of tens. For units in one
	// datacenter network.
	ProfileLAN Profile = "lan"
	// ProfileWAN is memberlist.DefaultWANConfig: a probe every 5 s,
	// longer timeouts and suspicion; for pools spread over regions where
	// a lost packet must not kill a member. Detection takes tens of
	// seconds.
	ProfileWAN Profile = "wan"
	// ProfileFast is built on memberlist.DefaultLocalConfig for a dead
	// member declared within a second at 10 to 50 members: a probe every
	// 80 ms, a 60 ms probe timeout, suspicion of 4 probe intervals (scaled
	// by log10 of the pool size) that shrinks as other members confirm
	// it, gossip every 40 ms to 5 members. A member paused for 300 ms refutes its
	// suspicion in time (bench/gossip.sh --soak). It costs more packets:
	// meant for a low-latency network, the demo and tests.
	ProfileFast Profile = "fast"
)

// Profiles lists the profile names.
var Profiles = []Profile{ProfileLAN, ProfileWAN, ProfileFast}

// ParseProfile reads a profile name; empty means ProfileLAN.
func ParseProfile(s string) (Profile, error) {
	if s == "" {
		return ProfileLAN, nil
	}
	p := Profile(s)
	if !slices.Contains(Profiles, p) {
		names := make([]string, len(Profiles))
		for i, p := range Profiles {
			names[i] = string(p)
		}
		return "", fmt.Errorf("gossip profile %q: want one of %s", s, strings.Join(names, ", "))
	}
	return p, nil
}

// config returns memberlist's configuration for the profile.
func (p Profile) config() *memberlist.Config {
	switch p {
	case ProfileWAN:
		return memberlist.DefaultWANConfig()
	case ProfileFast:
		c := memberlist.DefaultLocalConfig()
		c.ProbeInterval = 80 * time.Millisecond
		c.ProbeTimeout = 60 * time.Millisecond
		c.IndirectChecks = 3
		c.SuspicionMult = 4
		c.SuspicionMaxTimeoutMult = 2
		c.GossipInterval = 40 * time.Millisecond
		c.GossipNodes = 5
		c.RetransmitMult = 3
		c.PushPullInterval = 10 * time.Second
		c.TCPTimeout = time.Second
		c.GossipToTheDeadTime = 10 * time.Second
		return c
	}
	return memberlist.DefaultLANConfig()
}
