package meshtls

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io/fs"
	"log/slog"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoad(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	id := testID("u1", "ledger")
	p := c.issue(t, id, time.Hour, t0)
	s := newStore(t, c.cert, p, func() time.Time { return t0 })
	if s.ID() != id {
		t.Errorf("ID() = %v, want %v", s.ID(), id)
	}
	if want := t0.Add(time.Hour); !s.NotAfter().Equal(want) {
		t.Errorf("NotAfter() = %v, want %v", s.NotAfter(), want)
	}
	if !s.Leaf().Equal(parseCert(t, p.cert)) {
		t.Error("Leaf() is not the certificate of the cert file")
	}
}

// signCustom signs tmpl with the CA and returns it with its new key.
func signCustom(t *testing.T, c ca, tmpl *x509.Certificate) pair {
	t.Helper()
	caKey, err := parseKey(c.key)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	if tmpl.SerialNumber == nil {
		tmpl.SerialNumber = big.NewInt(42)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parseCert(t, c.cert), key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pair{pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM}
}

func TestLoadErrors(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	foreign := newTestCA(t, td, 24*time.Hour, t0)
	id := testID("u1", "ledger")
	good := c.issue(t, id, time.Hour, t0)
	other := c.issue(t, id, time.Hour, t0)
	noID := signCustom(t, c, &x509.Certificate{
		Subject: pkix.Name{CommonName: "no-id"}, NotBefore: t0.Add(-time.Minute), NotAfter: t0.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	})
	clientOnly := signCustom(t, c, &x509.Certificate{
		URIs: []*url.URL{id.URI()}, NotBefore: t0.Add(-time.Minute), NotAfter: t0.Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	tests := []struct {
		name string
		// files returns the files to load, in dir.
		files   func(dir string) Files
		now     time.Time
		kind    string // FileError.Kind
		file    string // base name of the file the error names
		wantErr []string
	}{
		{"missing-ca", func(dir string) Files {
			f := writeFiles(t, dir, "w", c.cert, good)
			f.CA = filepath.Join(dir, "nope.pem")
			return f
		}, t0, "CA", "nope.pem", []string{"no such file", "cellmesh certs init"}},
		{"missing-cert", func(dir string) Files {
			f := writeFiles(t, dir, "w", c.cert, good)
			f.Cert = filepath.Join(dir, "nope.pem")
			return f
		}, t0, "cert", "nope.pem", []string{"no such file", "cellmesh certs issue"}},
		{"missing-key", func(dir string) Files {
			f := writeFiles(t, dir, "w", c.cert, good)
			f.Key = filepath.Join(dir, "nope.pem")
			return f
		}, t0, "key", "nope.pem", []string{"no such file"}},
		{"no-ca-name", func(dir string) Files {
			f := writeFiles(t, dir, "w", c.cert, good)
			f.CA = ""
			return f
		}, t0, "CA", "", []string{"no file name given"}},
		{"ca-not-pem", func(dir string) Files {
			return writeFiles(t, dir, "w", []byte("hello"), good)
		}, t0, "CA", "ca.pem", []string{`no PEM "CERTIFICATE" block`}},
		{"ca-holds-a-key", func(dir string) Files {
			return writeFiles(t, dir, "w", append(append([]byte{}, c.cert...), c.key...), good)
		}, t0, "CA", "ca.pem", []string{`PEM block 2 is a "PRIVATE KEY"`}},
		{"ca-holds-a-leaf", func(dir string) Files {
			return writeFiles(t, dir, "w", append(append([]byte{}, c.cert...), good.cert...), good)
		}, t0, "CA", "ca.pem", []string{"is not a CA certificate"}},
		{"cert-not-pem", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, pair{[]byte("garbage"), good.key})
		}, t0, "cert", "w.pem", []string{`no PEM "CERTIFICATE" block`}},
		{"key-not-pem", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, pair{good.cert, good.cert})
		}, t0, "key", "w-key.pem", []string{`no PEM "PRIVATE KEY" block`}},
		{"key-mismatch", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, pair{good.cert, other.key})
		}, t0, "key", "w-key.pem", []string{"does not match the certificate in", "w.pem"}},
		{"expired", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, good)
		}, t0.Add(2 * time.Hour), "cert", "w.pem", []string{"expired at 2026-03-01T13:00:00Z", "cellmesh certs issue"}},
		{"not-yet-valid", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, good)
		}, t0.Add(-time.Hour), "cert", "w.pem", []string{"not valid before", "check the clock"}},
		{"foreign-ca", func(dir string) Files {
			return writeFiles(t, dir, "w", foreign.cert, good)
		}, t0, "cert", "w.pem", []string{"does not verify against the CA bundle", "ca.pem", "unknown authority"}},
		{"no-identity", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, noID)
		}, t0, "cert", "w.pem", []string{"no valid identity", "no URI SAN"}},
		{"client-only-usage", func(dir string) Files {
			return writeFiles(t, dir, "w", c.cert, clientOnly)
		}, t0, "cert", "w.pem", []string{"does not verify", "usage"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := tt.files(t.TempDir())
			s, err := Load(f, func() time.Time { return tt.now })
			if err == nil {
				t.Fatalf("Load succeeded with id %v", s.ID())
			}
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is %T, not a *FileError", err, err)
			}
			if fe.Kind != tt.kind || filepath.Base(fe.Path) != tt.file && tt.file != "" {
				t.Errorf("error names %s file %s, want %s file %s: %v", fe.Kind, fe.Path, tt.kind, tt.file, err)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if tt.file != "" && !strings.Contains(err.Error(), tt.file) {
				t.Errorf("error %q does not name the file %s", err, tt.file)
			}
		})
	}
	t.Run("missing-is-not-exist", func(t *testing.T) {
		_, err := Load(Files{CA: filepath.Join(t.TempDir(), "x"), Cert: "y", Key: "z"}, nil)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("error %v does not wrap fs.ErrNotExist", err)
		}
	})
}

func TestReload(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	id := testID("u1", "ledger")
	first := c.issue(t, id, time.Hour, t0)
	dir := t.TempDir()
	f := writeFiles(t, dir, "w", c.cert, first)
	now := func() time.Time { return t0 }
	s, err := Load(f, now)
	if err != nil {
		t.Fatal(err)
	}
	serial := func() *big.Int { return s.Leaf().SerialNumber }
	firstSerial := serial()

	second := c.issue(t, id, 2*time.Hour, t0)
	writeFiles(t, dir, "w", c.cert, second)
	if err := s.Reload(); err != nil {
		t.Fatal(err)
	}
	if got, want := serial(), parseCert(t, second.cert).SerialNumber; got.Cmp(want) != 0 || got.Cmp(firstSerial) == 0 {
		t.Fatalf("serial after reload %v, want %v", got, want)
	}
	if want := t0.Add(2 * time.Hour); !s.NotAfter().Equal(want) {
		t.Errorf("NotAfter() = %v, want %v", s.NotAfter(), want)
	}

	broken := []struct {
		name    string
		write   func()
		wantErr string
	}{
		{"garbage-cert", func() { writeFile(t, f.Cert, []byte("garbage")) }, "cert file"},
		{"missing-key", func() { os.Remove(f.Key) }, "key file"},
		{"mismatched-key", func() { writeFiles(t, dir, "w", c.cert, pair{first.cert, second.key}) }, "does not match"},
		{"other-identity", func() { writeFiles(t, dir, "w", c.cert, c.issue(t, testID("u2", "ledger"), time.Hour, t0)) }, "identity changed from"},
	}
	for _, b := range broken {
		t.Run(b.name, func(t *testing.T) {
			b.write()
			err := s.Reload()
			if err == nil || !strings.Contains(err.Error(), b.wantErr) {
				t.Fatalf("Reload() = %v, want an error containing %q", err, b.wantErr)
			}
			if got, want := serial(), parseCert(t, second.cert).SerialNumber; got.Cmp(want) != 0 {
				t.Errorf("serial %v after a failed reload, want the old %v", got, want)
			}
			if s.ID() != id {
				t.Errorf("ID() = %v after a failed reload, want %v", s.ID(), id)
			}
			writeFiles(t, dir, "w", c.cert, second) // repair for the next case
		})
	}
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// recordHandler sends each log record to a channel, dropping it when the
// channel is full.
type recordHandler struct{ ch chan slog.Record }

func (h recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h recordHandler) Handle(_ context.Context, r slog.Record) error {
	select {
	case h.ch <- r.Clone():
	default:
	}
	return nil
}
func (h recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h recordHandler) WithGroup(string) slog.Handler      { return h }

// waitRecord waits for a log record of the level and returns it.
func waitRecord(t *testing.T, ch <-chan slog.Record, level slog.Level) slog.Record {
	t.Helper()
	deadline := time.NewTimer(testTimeout)
	defer deadline.Stop()
	for {
		select {
		case r := <-ch:
			if r.Level == level {
				return r
			}
		case <-deadline.C:
			t.Fatalf("no %v log record within %v", level, testTimeout)
		}
	}
}

func recordAttrs(r slog.Record) map[string]string {
	m := map[string]string{}
	r.Attrs(func(a slog.Attr) bool {
		m[a.Key] = a.Value.String()
		return true
	})
	return m
}

// touch moves a file's modification time forward, so a change is seen even
// on a file system with a coarse clock.
func touch(t *testing.T, path string, d time.Duration) {
	t.Helper()
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	mt := info.ModTime().Add(d)
	if err := os.Chtimes(path, mt, mt); err != nil {
		t.Fatal(err)
	}
}

func TestWatch(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	id := testID("u1", "ledger")
	dir := t.TempDir()
	f := writeFiles(t, dir, "w", c.cert, c.issue(t, id, time.Hour, t0))
	s, err := Load(f, func() time.Time { return t0 })
	if err != nil {
		t.Fatal(err)
	}
	records := make(chan slog.Record, 64)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Watch(ctx, 5*time.Millisecond, slog.New(recordHandler{records}))
	}()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(testTimeout):
			t.Error("Watch did not return after its context ended")
		}
	}()

	// A new certificate and key are picked up. (Until both are written the
	// pair does not match, so no reload can succeed with half of it.)
	next := c.issue(t, id, 2*time.Hour, t0)
	writeFile(t, f.Cert, next.cert)
	writeFile(t, f.Key, next.key)
	touch(t, f.Cert, time.Second)
	touch(t, f.Key, time.Second)
	r := waitRecord(t, records, slog.LevelInfo)
	want := parseCert(t, next.cert).SerialNumber
	if got := s.Leaf().SerialNumber; got.Cmp(want) != 0 {
		t.Fatalf("serial after %q: %v, want %v", r.Message, got, want)
	}
	attrs := recordAttrs(r)
	if attrs["id"] != id.String() || !strings.Contains(attrs["not_after"], "2026-03-01 14:00:00") {
		t.Errorf("reload logged %v, want id %s and not_after 2026-03-01 14:00:00", attrs, id)
	}

	// A broken key is logged and the certificate in use kept.
	writeFile(t, f.Key, []byte("broken"))
	touch(t, f.Key, 2*time.Second)
	r = waitRecord(t, records, slog.LevelError)
	if attrs := recordAttrs(r); !strings.Contains(attrs["error"], f.Key) {
		t.Errorf("failed reload logged %v, want the key file named in error", attrs)
	}
	if got := s.Leaf().SerialNumber; got.Cmp(want) != 0 {
		t.Errorf("serial %v after a failed reload, want the old %v", got, want)
	}

	// Fixing it is picked up again, also when the file is replaced by a
	// rename.
	last := c.issue(t, id, 3*time.Hour, t0)
	writeFile(t, f.Cert+".tmp", last.cert)
	writeFile(t, f.Key+".tmp", last.key)
	if err := os.Rename(f.Key+".tmp", f.Key); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(f.Cert+".tmp", f.Cert); err != nil {
		t.Fatal(err)
	}
	want = parseCert(t, last.cert).SerialNumber
	deadline := time.Now().Add(testTimeout)
	for s.Leaf().SerialNumber.Cmp(want) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the renamed files were not loaded within %v", testTimeout)
		}
		waitRecord(t, records, slog.LevelInfo)
	}
}

func TestWatchStopsWithContext(t *testing.T) {
	c := newTestCA(t, td, 24*time.Hour, t0)
	s := newStore(t, c.cert, c.issue(t, testID("u1", "s"), time.Hour, t0), func() time.Time { return t0 })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Watch(ctx, 0, nil)
	}()
	select {
	case <-done:
	case <-time.After(testTimeout):
		t.Fatal("Watch did not return for a context already done")
	}
}

// DeriveKey is stable for one key and label, and differs by label and key.
func TestDeriveKey(t *testing.T) {
	dir := t.TempDir()
	caCert, caKey, err := NewCA("cellmesh.test", time.Hour, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	load := func(name string) *Store {
		id := ID{TrustDomain: "cellmesh.test", Region: "r", Unit: "u", Service: "s"}
		cert, key, err := Issue(caCert, caKey, id, nil, time.Hour, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		f := Files{CA: filepath.Join(dir, "ca.pem"), Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem")}
		for p, b := range map[string][]byte{f.CA: caCert, f.Cert: cert, f.Key: key} {
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		s, err := Load(f, nil)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	a, b := load("a"), load("b")
	k1, err1 := a.DeriveKey("quic-reset")
	k2, err2 := a.DeriveKey("quic-reset")
	k3, _ := a.DeriveKey("other")
	k4, _ := b.DeriveKey("quic-reset")
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if k1 != k2 || k1 == k3 || k1 == k4 || k1 == ([32]byte{}) {
		t.Fatalf("keys: same label %v, other label %v, other key %v", k1 == k2, k1 == k3, k1 == k4)
	}
}
