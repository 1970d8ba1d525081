package meshtls

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// t0 is the test's "now" when it needs a fixed one.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const td = "cellmesh.test"

// testTimeout bounds every wait of a test.
const testTimeout = 10 * time.Second

// ca is a test CA.
type ca struct{ cert, key []byte }

func newTestCA(t *testing.T, trustDomain string, validity time.Duration, now time.Time) ca {
	t.Helper()
	c, k, err := NewCA(trustDomain, validity, now)
	if err != nil {
		t.Fatal(err)
	}
	return ca{c, k}
}

// pair is an issued certificate and its key.
type pair struct{ cert, key []byte }

func (c ca) issue(t *testing.T, id ID, validity time.Duration, now time.Time) pair {
	t.Helper()
	cert, key, err := Issue(c.cert, c.key, id, []string{"127.0.0.1", "localhost"}, validity, now)
	if err != nil {
		t.Fatal(err)
	}
	return pair{cert, key}
}

func testID(unit, service string) ID {
	return ID{TrustDomain: td, Region: "us-east", Unit: unit, Service: service}
}

// writeFiles writes a CA bundle and a pair into dir as ca.pem, NAME.pem and
// NAME-key.pem.
func writeFiles(t *testing.T, dir, name string, bundle []byte, p pair) Files {
	t.Helper()
	f := Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem")}
	for path, data := range map[string][]byte{f.CA: bundle, f.Cert: p.cert, f.Key: p.key} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// newStore writes the files into a new directory and loads them.
func newStore(t *testing.T, bundle []byte, p pair, now func() time.Time) *Store {
	t.Helper()
	s, err := Load(writeFiles(t, t.TempDir(), "w", bundle, p), now)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func bundle(cas ...ca) []byte {
	var b []byte
	for _, c := range cas {
		b = append(b, c.cert...)
	}
	return b
}

func parseCert(t *testing.T, pemData []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(pemData)
	if block == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// clock is a settable clock for a Store.
type clock struct{ t atomic.Pointer[time.Time] }

func newClock(t time.Time) *clock {
	c := &clock{}
	c.set(t)
	return c
}
func (c *clock) now() time.Time      { return *c.t.Load() }
func (c *clock) set(t time.Time)     { c.t.Store(&t) }
func (c *clock) add(d time.Duration) { c.set(c.now().Add(d)) }

// rejects records onReject calls.
type rejects struct {
	mu    sync.Mutex
	calls []reject
}

type reject struct {
	remote string
	err    error
}

func (r *rejects) record(remote string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, reject{remote, err})
}

func (r *rejects) get() []reject {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]reject(nil), r.calls...)
}

// server is a TLS echo server on 127.0.0.1 that reports each handshake.
type server struct {
	ln      net.Listener
	results chan handshakeResult
	wg      sync.WaitGroup
}

type handshakeResult struct {
	err    error
	state  tls.ConnectionState
	remote string
}

func startServer(t *testing.T, cfg *tls.Config) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln, results: make(chan handshakeResult, 16)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer c.Close()
				tc := tls.Server(c, cfg)
				ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
				err := tc.HandshakeContext(ctx)
				cancel()
				s.results <- handshakeResult{err: err, state: tc.ConnectionState(), remote: c.RemoteAddr().String()}
				if err != nil {
					return
				}
				_ = tc.SetDeadline(time.Now().Add(testTimeout))
				_, _ = io.Copy(tc, tc) // echo until the client closes
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		s.wg.Wait()
	})
	return s
}

func (s *server) addr() string { return s.ln.Addr().String() }

// result waits for the server's next handshake.
func (s *server) result(t *testing.T) handshakeResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(testTimeout):
		t.Fatal("server did not finish a handshake in time")
		return handshakeResult{}
	}
}

// dial connects and handshakes; in TLS 1.3 the client is done before the
// server has checked its certificate, so it also round-trips one byte to
// learn whether the server accepted it.
func dial(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	d := tls.Dialer{Config: cfg}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	tc := c.(*tls.Conn)
	t.Cleanup(func() { tc.Close() })
	if err := echo(tc, "x"); err != nil {
		return nil, err
	}
	return tc, nil
}

// echo writes msg and reads it back.
func echo(c *tls.Conn, msg string) error {
	if err := c.SetDeadline(time.Now().Add(testTimeout)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if !bytes.Equal(buf, []byte(msg)) {
		return errors.New("echo returned " + string(buf))
	}
	return nil
}

// wantVerifyError checks that err is a *VerifyError with the reason.
func wantVerifyError(t *testing.T, err error, reason Reason) *VerifyError {
	t.Helper()
	var ve *VerifyError
	if !errors.As(err, &ve) {
		t.Fatalf("error %v (%T) is not a *VerifyError", err, err)
	}
	if ve.Reason != reason {
		t.Fatalf("reason %q, want %q (error: %v)", ve.Reason, reason, err)
	}
	return ve
}
