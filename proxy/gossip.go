package proxy

import (
	"context"
	"errors"
	"time"

	"github.com/cellmesh/cellmesh/failover"
)

// GossipConfig joins a sidecar to the gossip pool. Its Member's Meta,
// Name, Observer and Logger are the sidecar's own: the metadata says its
// region, unit, service and the inbound address it registers.
type GossipConfig struct {
	Member failover.Config
	// Advertise is the inbound listener the sidecar registers (as in
	// XDSConfig): its address goes in the metadata, so the control plane
	// matches the member to the endpoint.
	Advertise Transport
	// KeyFile, when set, is re-read every Reload and on a kick: a changed
	// keyring replaces the one held (a key rotation).
	KeyFile string
	Reload  time.Duration
}

// RunGossip joins the pool and stays in it until ctx ends, then leaves
// (the others see the sidecar left, not dead). Call it once, beside Run;
// kick re-reads the key file at once.
func (s *Sidecar) RunGossip(ctx context.Context, cfg GossipConfig, kick <-chan struct{}) error {
	if err := s.Listen(); err != nil {
		return err
	}
	if cfg.Advertise == "" {
		cfg.Advertise = QUIC
	}
	addr, err := s.advertised(cfg.Advertise)
	if err != nil {
		return err
	}
	id := s.cfg.Identity
	mc := cfg.Member
	mc.Meta = failover.Meta{Role: failover.RoleSidecar, Region: id.Region, Unit: id.Unit, Service: id.Service, Address: addr, Transport: string(cfg.Advertise)}
	mc.Name = ""
	mc.Observer = s.health
	mc.Logger = s.cfg.Logger
	ms, err := failover.Start(mc)
	if err != nil {
		return err
	}
	if !s.gossip.CompareAndSwap(nil, ms) {
		ms.Close()
		return errors.New("gossip: RunGossip called twice")
	}
	s.log.Info("gossip joined", "member", ms.Name(), "gossip", ms.Addr(), "profile", string(mc.Profile))
	if cfg.KeyFile != "" {
		go ms.WatchKeyFile(ctx, cfg.KeyFile, cfg.Reload, kick)
	}
	go func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-t.C:
				s.health.Tick(now)
			}
		}
	}()
	return ms.Run(ctx)
}
