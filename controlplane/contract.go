package controlplane

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/meshtls"
)

// contract calls a stateful service's handoff contract through the
// sidecar beside it: over QUIC (or HTTP/2 on TLS for an h2 endpoint) with
// this replica's mesh certificate, which sidecars admit for the contract's
// paths only. Each endpoint gets a client that checks the sidecar's
// certificate is of the endpoint's unit and service.
type contract struct {
	tls     *meshtls.Store
	mu      sync.Mutex
	clients map[string]*http.Client // by transport://address
}

func newContract(tls *meshtls.Store) *contract {
	return &contract{tls: tls, clients: map[string]*http.Client{}}
}

func (c *contract) client(ep store.Registration) *http.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl, ok := c.clients[ep.Key()]; ok {
		return cl
	}
	expect := func(peer meshtls.ID) error {
		if peer.Unit != ep.Unit || peer.Service != ep.Service {
			return fmt.Errorf("the endpoint at %s is %s in %s, the certificate says %s", ep.Address, ep.Service, ep.Unit, peer)
		}
		return nil
	}
	tc := c.tls.ClientConfig(expect, nil)
	var rt http.RoundTripper
	if ep.Transport == "h2" {
		rt = &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true, IdleConnTimeout: time.Minute}
	} else {
		tc = tc.Clone()
		tc.NextProtos = []string{http3.NextProtoH3}
		rt = &http3.Transport{TLSClientConfig: tc, QUICConfig: &quic.Config{HandshakeIdleTimeout: 2 * time.Second, MaxIdleTimeout: 30 * time.Second, KeepAlivePeriod: 10 * time.Second}}
	}
	cl := &http.Client{Transport: rt, Timeout: 3 * time.Second}
	c.clients[ep.Key()] = cl
	return cl
}

// close drops the clients of endpoints no longer registered.
func (c *contract) forget(keep map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, cl := range c.clients {
		if !keep[k] {
			cl.CloseIdleConnections()
			if h3, ok := cl.Transport.(*http3.Transport); ok {
				h3.Close()
			}
			delete(c.clients, k)
		}
	}
}

func (c *contract) do(ctx context.Context, ep store.Registration, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "https://"+ep.Address+path, nil)
	if err != nil {
		return err
	}
	req.Host = ep.Service
	resp, err := c.client(ep).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if resp.StatusCode != http.StatusOK {
		return &contractError{Code: resp.StatusCode, Body: string(body)}
	}
	if out != nil {
		return json.Unmarshal(body, out)
	}
	return nil
}

type contractError struct {
	Code int
	Body string
}

func (e *contractError) Error() string { return fmt.Sprintf("HTTP %d: %s", e.Code, e.Body) }

// report reads the service's replication watermarks.
func (c *contract) report(ctx context.Context, ep store.Registration) (failover.Replication, error) {
	var rep failover.Replication
	err := c.do(ctx, ep, "GET", "/.well-known/cellmesh/replication", &rep)
	return rep, err
}

// role calls promote or demote for shard at epoch.
func (c *contract) role(ctx context.Context, ep store.Registration, action string, shard int, epoch uint64) error {
	return c.do(ctx, ep, "POST", "/.well-known/cellmesh/"+action+"?shard="+strconv.Itoa(shard)+"&epoch="+strconv.FormatUint(epoch, 10), nil)
}
