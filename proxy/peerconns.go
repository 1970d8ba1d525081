package proxy

import (
	"io"
	"sync"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// peerConns tracks the connections open to each peer endpoint (by
// transport://address), so that those to a peer the control plane finds
// dead are closed at once: a request in flight on one fails now, not at
// its timeout, and the pool dials afresh if the peer comes back. A peer
// that leaves the pool draining (a clean stop) keeps its connections: its
// requests in flight finish.
type peerConns struct {
	mu sync.Mutex
	by map[string]map[io.Closer]struct{}
}

func (p *peerConns) add(key string, c io.Closer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.by == nil {
		p.by = map[string]map[io.Closer]struct{}{}
	}
	if p.by[key] == nil {
		p.by[key] = map[io.Closer]struct{}{}
	}
	p.by[key][c] = struct{}{}
}

func (p *peerConns) remove(key string, c io.Closer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.by[key], c)
	if len(p.by[key]) == 0 {
		delete(p.by, key)
	}
}

// closeAll closes every connection to the endpoints keys, in the
// background (a QUIC close waits for the connection's loop), and says how
// many it closes.
func (p *peerConns) closeAll(keys []string) int {
	var cs []io.Closer
	p.mu.Lock()
	for _, k := range keys {
		for c := range p.by[k] {
			cs = append(cs, c)
		}
		delete(p.by, k)
	}
	p.mu.Unlock()
	for _, c := range cs {
		go c.Close()
	}
	return len(cs)
}

// trackQUIC tracks a QUIC connection to key until it ends.
func (p *peerConns) trackQUIC(key string, conn *quic.Conn) {
	c := quicCloser{conn}
	p.add(key, c)
	go func() {
		<-conn.Context().Done()
		p.remove(key, c)
	}()
}

type quicCloser struct{ conn *quic.Conn }

func (c quicCloser) Close() error {
	return c.conn.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "cellmesh: the control plane finds this peer dead")
}
