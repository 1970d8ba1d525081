package meshtls

import (
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// TestQUIC runs the configurations under quic-go, which calls
// GetConfigForClient with a ClientHelloInfo of its own: the remote address
// reaches onReject, and fields set on the returned config (NextProtos) reach
// each connection.
func TestQUIC(t *testing.T) {
	m := newMesh(t, time.Now())
	srv := newStore(t, m.ca.cert, m.server, nil)
	var rejected rejects
	scfg := srv.ServerConfig(nil, rejected.record)
	scfg.NextProtos = []string{"cellmesh-test"}
	ln, err := quic.ListenAddr("127.0.0.1:0", scfg, &quic.Config{HandshakeIdleTimeout: testTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	dial := func(t *testing.T, st *Store) (*quic.Conn, string, error) {
		t.Helper()
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		tr := &quic.Transport{Conn: pc}
		t.Cleanup(func() {
			tr.Close()
			pc.Close()
		})
		ccfg := st.ClientConfig(nil, nil)
		ccfg.NextProtos = []string{"cellmesh-test"}
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		c, err := tr.Dial(ctx, ln.Addr(), ccfg, &quic.Config{HandshakeIdleTimeout: testTimeout})
		if c != nil {
			t.Cleanup(func() { _ = c.CloseWithError(0, "") })
		}
		return c, pc.LocalAddr().String(), err
	}

	t.Run("good", func(t *testing.T) {
		cli := newStore(t, m.ca.cert, m.client, nil)
		c, _, err := dial(t, cli)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		sc, err := ln.Accept(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer sc.CloseWithError(0, "")
		if id, err := PeerID(sc.ConnectionState().TLS.PeerCertificates); err != nil || id != m.clientID {
			t.Errorf("server sees %v, %v; want %v", id, err, m.clientID)
		}
		if id, err := PeerID(c.ConnectionState().TLS.PeerCertificates); err != nil || id != m.serverID {
			t.Errorf("client sees %v, %v; want %v", id, err, m.serverID)
		}
		if p := sc.ConnectionState().TLS.NegotiatedProtocol; p != "cellmesh-test" {
			t.Errorf("negotiated protocol %q, want cellmesh-test", p)
		}
		if cs := c.ConnectionState().TLS; cs.Version != tls.VersionTLS13 {
			t.Errorf("TLS version %x, want 1.3", cs.Version)
		}
	})

	t.Run("foreign-client", func(t *testing.T) {
		cli := newStore(t, bundle(m.ca, m.foreign), m.foreign.issue(t, m.clientID, time.Hour, time.Now()), nil)
		c, local, err := dial(t, cli)
		if err == nil {
			// The client's side of the handshake may complete before the
			// server has checked the client: then the server closes it.
			select {
			case <-c.Context().Done():
			case <-time.After(testTimeout):
				t.Fatal("a client of a foreign CA was accepted")
			}
			err = context.Cause(c.Context())
		}
		if !strings.Contains(err.Error(), "bad certificate") {
			t.Errorf("client error %v, want a bad certificate alert", err)
		}
		// onReject runs before the server sends the alert the client saw.
		got := rejected.get()
		if len(got) != 1 || got[0].remote != local {
			t.Fatalf("onReject calls %v, want one with remote %s", got, local)
		}
		wantVerifyError(t, got[0].err, ReasonUnknownCA)
	})
}
