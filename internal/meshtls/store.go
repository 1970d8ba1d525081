package meshtls

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultWatchInterval is how often Watch looks at the files when given no
// interval: often enough that a rotated certificate is in use well within a
// minute, rarely enough to cost nothing.
const DefaultWatchInterval = 10 * time.Second

// Files names the PEM files of a Store.
type Files struct {
	// CA holds the trusted mesh CA certificates. It may hold several: during
	// a CA rotation the old and the new CA are trusted together.
	CA string
	// Cert holds this workload's certificate, first, then any intermediate.
	Cert string
	// Key holds the certificate's private key.
	Key string
}

// FileError is a problem with one of a Store's files. Its message names the
// file, says what is wrong and what to do.
type FileError struct {
	Kind string // "CA", "cert" or "key"
	Path string
	Err  error  // what is wrong
	Fix  string // what to do about it
}

func (e *FileError) Error() string {
	msg := fmt.Sprintf("%s file %s: %v", e.Kind, e.Path, e.Err)
	if e.Fix != "" {
		msg += "; " + e.Fix
	}
	return msg
}

func (e *FileError) Unwrap() error { return e.Err }

// Hints for FileError.Fix.
const (
	fixCA   = "point it at the mesh CA bundle (ca.pem written by 'cellmesh certs init')"
	fixCert = "issue a new certificate and key with 'cellmesh certs issue'"
)

// Store holds a workload's mesh TLS material: the CA bundle it trusts, its
// certificate and key, and its ID. Handshakes read it through an atomic
// pointer, so Reload changes what new handshakes use while established
// connections go on. A Store is safe for concurrent use.
type Store struct {
	files  Files
	now    func() time.Time
	mu     sync.Mutex // serializes reloads; never held by a handshake
	cur    atomic.Pointer[material]
	stamps atomic.Pointer[stamps] // of the files as last looked at by Watch, or as read by Load
}

// material is what a Store holds at one time; it is never modified once
// stored.
type material struct {
	cert  tls.Certificate // Leaf set
	id    ID
	roots *x509.CertPool
	cas   []*x509.Certificate
}

// Load reads and checks the files: every block of the CA file is a CA
// certificate, the key matches the certificate, the certificate chains to a
// CA of the bundle, is valid now, may be used as both TLS client and server,
// and carries a valid ID. now is the clock for these checks and for peer
// verification later; nil means time.Now. Every error is a *FileError.
func Load(f Files, now func() time.Time) (*Store, error) {
	if now == nil {
		now = time.Now
	}
	s := &Store{files: f, now: now}
	st := stampFiles(f)
	m, err := s.read()
	if err != nil {
		return nil, err
	}
	s.cur.Store(m)
	s.stamps.Store(&st)
	return s, nil
}

// Reload reads the files again. On any error it keeps the material it had
// and returns the error. It also refuses a certificate with another ID than
// the one in use: a workload does not change identity while it runs.
func (s *Store) Reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, err := s.read()
	if err != nil {
		return err
	}
	if old := s.cur.Load(); m.id != old.id {
		return &FileError{Kind: "cert", Path: s.files.Cert,
			Err: fmt.Errorf("identity changed from %s to %s", old.id, m.id),
			Fix: "a running workload keeps its identity: issue the certificate for " + old.id.String() + ", or restart the workload with the new identity"}
	}
	s.cur.Store(m)
	return nil
}

// ID returns the workload's identity.
func (s *Store) ID() ID { return s.cur.Load().id }

// NotAfter returns when the certificate in use expires.
func (s *Store) NotAfter() time.Time { return s.cur.Load().cert.Leaf.NotAfter }

// Leaf returns the certificate in use. It must not be modified.
func (s *Store) Leaf() *x509.Certificate { return s.cur.Load().cert.Leaf }

// Files returns the files the Store reads.
func (s *Store) Files() Files { return s.files }

// Watch looks at the files' modification time, size and identity (a file
// replaced by a rename counts as changed) every interval until ctx ends,
// and calls Reload when any of them changed. It logs a reload at info (with
// the certificate's not_after) and a failed one at error, keeping the old
// material. interval <= 0 means DefaultWatchInterval; a nil log discards.
// Watch returns when ctx is done; run it on a goroutine of your own.
func (s *Store) Watch(ctx context.Context, interval time.Duration, log *slog.Logger) {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// Stamp before reading, so a write during the reload shows up as a
		// change next time.
		st := stampFiles(s.files)
		if st.equal(s.stamps.Load()) {
			continue
		}
		s.stamps.Store(&st)
		if err := s.Reload(); err != nil {
			log.Error("mesh tls reload failed; keeping the certificate in use", "error", err, "not_after", s.NotAfter())
			continue
		}
		leaf := s.Leaf()
		log.Info("mesh tls reloaded", "id", s.ID().String(), "serial", leaf.SerialNumber.Text(16), "not_after", leaf.NotAfter)
	}
}

// read reads and checks the files.
func (s *Store) read() (*material, error) {
	f := s.files
	caErr := func(err error) error { return &FileError{Kind: "CA", Path: f.CA, Err: err, Fix: fixCA} }
	certErr := func(err error) error { return &FileError{Kind: "cert", Path: f.Cert, Err: err, Fix: fixCert} }
	keyErr := func(err error) error { return &FileError{Kind: "key", Path: f.Key, Err: err, Fix: fixCert} }
	for _, p := range []struct {
		path string
		fail func(error) error
	}{{f.CA, caErr}, {f.Cert, certErr}, {f.Key, keyErr}} {
		if p.path == "" {
			return nil, p.fail(errors.New("no file name given"))
		}
	}

	data, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, caErr(err)
	}
	cas, err := parseCerts(data)
	if err != nil {
		return nil, caErr(err)
	}
	roots := x509.NewCertPool()
	for _, ca := range cas {
		if !ca.IsCA || !ca.BasicConstraintsValid {
			return nil, caErr(fmt.Errorf("certificate %q is not a CA certificate", ca.Subject.CommonName))
		}
		roots.AddCert(ca)
	}

	data, err = os.ReadFile(f.Cert)
	if err != nil {
		return nil, certErr(err)
	}
	chain, err := parseCerts(data)
	if err != nil {
		return nil, certErr(err)
	}
	leaf := chain[0]

	data, err = os.ReadFile(f.Key)
	if err != nil {
		return nil, keyErr(err)
	}
	key, err := parseKey(data)
	if err != nil {
		return nil, keyErr(err)
	}
	if certForKey(chain[:1], key.Public()) == nil {
		return nil, &FileError{Kind: "key", Path: f.Key,
			Err: fmt.Errorf("does not match the certificate in %s", f.Cert),
			Fix: "install the key and certificate written together by 'cellmesh certs issue'"}
	}

	now := s.now()
	switch {
	case now.Before(leaf.NotBefore):
		return nil, certErr(fmt.Errorf("not valid before %s (now %s); check the clock", formatTime(leaf.NotBefore), formatTime(now)))
	case now.After(leaf.NotAfter):
		return nil, certErr(fmt.Errorf("expired at %s (now %s)", formatTime(leaf.NotAfter), formatTime(now)))
	}
	id, err := PeerID(chain)
	if err != nil {
		return nil, certErr(fmt.Errorf("no valid identity: %w", err))
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now}
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		opts.KeyUsages = []x509.ExtKeyUsage{usage}
		if _, err := leaf.Verify(opts); err != nil {
			return nil, &FileError{Kind: "cert", Path: f.Cert,
				Err: fmt.Errorf("does not verify against the CA bundle %s: %w", f.CA, err),
				Fix: "issue it from a CA in that bundle with 'cellmesh certs issue', for use as both TLS client and server"}
		}
	}
	raw := make([][]byte, len(chain))
	for i, c := range chain {
		raw[i] = c.Raw
	}
	return &material{
		cert:  tls.Certificate{Certificate: raw, PrivateKey: key, Leaf: leaf},
		id:    id,
		roots: roots,
		cas:   cas,
	}, nil
}

// stamps are what Watch compares to see a file change.
type stamps [3]stamp

type stamp struct {
	info os.FileInfo // nil when Stat failed
	err  string
}

func stampFiles(f Files) stamps {
	var st stamps
	for i, path := range []string{f.CA, f.Cert, f.Key} {
		info, err := os.Stat(path)
		if err != nil {
			st[i] = stamp{err: err.Error()}
			continue
		}
		st[i] = stamp{info: info}
	}
	return st
}

func (st *stamps) equal(old *stamps) bool {
	if old == nil {
		return false
	}
	for i, a := range st {
		b := old[i]
		switch {
		case a.info == nil || b.info == nil:
			if a.info != b.info || a.err != b.err {
				return false
			}
		case !os.SameFile(a.info, b.info) || !a.info.ModTime().Equal(b.info.ModTime()) || a.info.Size() != b.info.Size():
			return false
		}
	}
	return true
}

// DeriveKey returns a secret for label derived from the workload's private
// key (HMAC-SHA256 keyed with the key's PKCS#8 form): the same across
// restarts with the same key, unknown to anyone without it. The sidecar
// derives its QUIC stateless reset key from it, so that a restarted sidecar
// can reset the connections its previous run left open.
func (s *Store) DeriveKey(label string) ([32]byte, error) {
	var out [32]byte
	der, err := x509.MarshalPKCS8PrivateKey(s.cur.Load().cert.PrivateKey)
	if err != nil {
		return out, fmt.Errorf("derive a key from the private key: %w", err)
	}
	mac := hmac.New(sha256.New, der)
	mac.Write([]byte(label))
	copy(out[:], mac.Sum(nil))
	return out, nil
}
