package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
)

// The files of a mesh CA in its --dir.
const (
	caCertFile = "ca.pem"
	caKeyFile  = "ca-key.pem"
)

const day = 24 * time.Hour

// maxDays bounds --days, far below where a time.Duration overflows.
const maxDays = 100 * 365

const certsUsage = `Usage: cellmesh certs <init|issue> [flags]

Makes the mesh's certificates for development and small deployments: one
mesh CA per trust domain, and a certificate per workload that carries its
identity spiffe://<trust-domain>/region/<R>/unit/<U>/service/<S>.

Subcommands:
  init    --dir DIR --trust-domain TD [--days 365]
          make a mesh CA: DIR/ca.pem (give it to every sidecar) and
          DIR/ca-key.pem (keep it secret, off the servers)
  issue   --dir DIR --region R --unit U --service S [--host H]... [--days 30] [--name NAME]
          issue a workload certificate: DIR/NAME.pem and DIR/NAME-key.pem

Run 'cellmesh certs <init|issue> --help' for the flags. Exit 0 on success,
1 on bad input or a failure, 2 on a usage mistake.
`

func runCerts(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || isHelp(args[0]) {
		if len(args) == 0 {
			fmt.Fprint(stderr, certsUsage)
			return exitUsage
		}
		fmt.Fprint(stdout, certsUsage)
		return exitOK
	}
	switch args[0] {
	case "init":
		return runCertsInit(args[1:], stdout, stderr)
	case "issue":
		return runCertsIssue(args[1:], stdout, stderr)
	}
	return usagef(stderr, "certs", "unknown subcommand %q (want init or issue)", args[0])
}

func runCertsInit(args []string, stdout, stderr io.Writer) int {
	const cmd = "certs init"
	fset := newFlags(cmd, "cellmesh certs init --dir DIR --trust-domain TD [--days 365]",
		`Makes a mesh CA: an ECDSA P-256 self-signed certificate for the trust
domain, written to DIR/`+caCertFile+`, and its key, written to DIR/`+caKeyFile+`
(mode 0600; DIR is created with mode 0700). Every sidecar trusts `+caCertFile+`;
'cellmesh certs issue' signs workload certificates with the key. It never
overwrites a CA: losing one would strand every certificate it signed.`, stderr)
	dir := fset.String("dir", "", "directory for "+caCertFile+" and "+caKeyFile+" (required)")
	trustDomain := fset.String("trust-domain", "", "trust domain of the mesh, a lowercase DNS-like name such as mesh.example.com (required)")
	days := fset.Int("days", 365, "days the CA is valid")
	if code, done := parse(fset, args, stdout); done {
		return code
	}
	if fset.NArg() > 0 {
		return usagef(stderr, cmd, "unexpected argument %q", fset.Arg(0))
	}
	switch {
	case *dir == "":
		return usagef(stderr, cmd, "--dir is required")
	case *trustDomain == "":
		return usagef(stderr, cmd, "--trust-domain is required")
	}
	if err := checkDays(*days); err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	if err := meshtls.ValidateTrustDomain(*trustDomain); err != nil {
		return failf(stderr, cmd, "--trust-domain: %v", err)
	}
	certPath, keyPath := filepath.Join(*dir, caCertFile), filepath.Join(*dir, caKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Lstat(p); err == nil {
			return failf(stderr, cmd, "%s already exists; a CA is never overwritten: pass a new --dir, or remove %s and %s first (every certificate the old CA signed stops being trusted)", p, certPath, keyPath)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return failf(stderr, cmd, "%v", err)
		}
	}
	certPEM, keyPEM, err := meshtls.NewCA(*trustDomain, time.Duration(*days)*day, time.Now())
	if err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	cert, err := firstCert(certPEM)
	if err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	_, statErr := os.Stat(*dir)
	if err := os.MkdirAll(*dir, 0o700); err != nil {
		return failf(stderr, cmd, "create --dir: %v", err)
	}
	if err := writeNew([]newFile{{keyPath, keyPEM, 0o600}, {certPath, certPEM, 0o644}}); err != nil {
		if errors.Is(statErr, fs.ErrNotExist) {
			_ = os.Remove(*dir) // made it; leave nothing behind
		}
		return failf(stderr, cmd, "%v", err)
	}
	fmt.Fprintf(stdout, "wrote %s: mesh CA for trust domain %s, valid until %s\n", certPath, *trustDomain, cert.NotAfter.UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "wrote %s: the CA's private key (mode 0600); keep it secret and off the servers\n", keyPath)
	fmt.Fprintf(stdout, "next: cellmesh certs issue --dir %s --region R --unit U --service S\n", *dir)
	return exitOK
}

func runCertsIssue(args []string, stdout, stderr io.Writer) int {
	const cmd = "certs issue"
	fset := newFlags(cmd, "cellmesh certs issue --dir DIR --region R --unit U --service S [--host H]... [--days 30] [--name NAME]",
		`Issues a workload certificate signed by the mesh CA in DIR (`+caCertFile+`
and `+caKeyFile+`, made by 'cellmesh certs init'). It carries the identity
spiffe://<trust-domain>/region/<R>/unit/<U>/service/<S>, the --host names
and addresses, and may serve and call as TLS server and client. Writes
DIR/NAME.pem and DIR/NAME-key.pem (mode 0600), replacing an older pair
of that name at once (a sidecar watching them picks up the new pair). It
never outlives the CA: --days is cut to the CA's expiry.`, stderr)
	dir := fset.String("dir", "", "directory of the mesh CA; the certificate is written there too (required)")
	region := fset.String("region", "", "region of the workload (required)")
	unit := fset.String("unit", "", "unit of the workload (required)")
	service := fset.String("service", "", "service of the workload (required)")
	var hosts listFlag
	fset.Var(&hosts, "host", "DNS name or IP address the workload serves on (repeatable or comma-separated; default 127.0.0.1 and localhost)")
	days := fset.Int("days", 30, "days the certificate is valid")
	name := fset.String("name", "", "base name of the files NAME.pem and NAME-key.pem (default <unit>-<service>)")
	if code, done := parse(fset, args, stdout); done {
		return code
	}
	if fset.NArg() > 0 {
		return usagef(stderr, cmd, "unexpected argument %q", fset.Arg(0))
	}
	for _, req := range []struct{ flag, value string }{
		{"dir", *dir}, {"region", *region}, {"unit", *unit}, {"service", *service},
	} {
		if req.value == "" {
			return usagef(stderr, cmd, "--%s is required", req.flag)
		}
	}
	for _, part := range []struct{ flag, value string }{
		{"region", *region}, {"unit", *unit}, {"service", *service},
	} {
		if err := meshtls.ValidateSegment(part.value); err != nil {
			return failf(stderr, cmd, "--%s: %v", part.flag, err)
		}
	}
	if err := checkDays(*days); err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	if len(hosts) == 0 {
		hosts = listFlag{"127.0.0.1", "localhost"}
	}
	if *name == "" {
		*name = *unit + "-" + *service
	}
	if err := checkName(*name); err != nil {
		return failf(stderr, cmd, "--name %q: %v", *name, err)
	}

	caFail := func(err error) int {
		if errors.Is(err, fs.ErrNotExist) {
			return failf(stderr, cmd, "no mesh CA in %s: %v; make one with 'cellmesh certs init --dir %s --trust-domain TD'", *dir, err, *dir)
		}
		return failf(stderr, cmd, "%v", err)
	}
	caCert, err := os.ReadFile(filepath.Join(*dir, caCertFile))
	if err != nil {
		return caFail(err)
	}
	caKey, err := os.ReadFile(filepath.Join(*dir, caKeyFile))
	if err != nil {
		return caFail(err)
	}
	return issue(cmd, *dir, *name, caCert, caKey, *region, *unit, *service, hosts, *days, stdout, stderr)
}

// issue signs and writes a workload certificate with the CA's PEM.
func issue(cmd, dir, name string, caCert, caKey []byte, region, unit, service string, hosts []string, days int, stdout, stderr io.Writer) int {
	td, err := meshtls.CATrustDomain(caCert, caKey)
	if err != nil {
		return failf(stderr, cmd, "mesh CA %s and %s: %v", filepath.Join(dir, caCertFile), filepath.Join(dir, caKeyFile), err)
	}
	id := meshtls.ID{TrustDomain: td, Region: region, Unit: unit, Service: service}
	if err := id.Validate(); err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	now := time.Now()
	certPEM, keyPEM, err := meshtls.Issue(caCert, caKey, id, hosts, time.Duration(days)*day, now)
	if err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	cert, err := firstCert(certPEM)
	if err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	certPath, keyPath := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	if err := writeReplace([]newFile{{keyPath, keyPEM, 0o600}, {certPath, certPEM, 0o644}}); err != nil {
		return failf(stderr, cmd, "%v", err)
	}
	fmt.Fprintf(stdout, "identity  %s\n", id)
	fmt.Fprintf(stdout, "hosts     %s\n", strings.Join(hosts, ", "))
	fmt.Fprintf(stdout, "expires   %s", cert.NotAfter.UTC().Format(time.RFC3339))
	if want := now.Add(time.Duration(days) * day).Truncate(time.Second); cert.NotAfter.Before(want) {
		fmt.Fprint(stdout, " (cut to the CA's expiry)")
	}
	fmt.Fprintln(stdout)
	fmt.Fprintf(stdout, "wrote %s\n", certPath)
	fmt.Fprintf(stdout, "wrote %s (mode 0600)\n", keyPath)
	return exitOK
}

func checkDays(days int) error {
	if days <= 0 || days > maxDays {
		return fmt.Errorf("--days %d: want a number of days from 1 to %d", days, maxDays)
	}
	return nil
}

// firstCert parses the first certificate of a PEM made by meshtls.
func firstCert(pemData []byte) (*x509.Certificate, error) {
	block, _ := pem.Decode(pemData)
	if block == nil {
		return nil, errors.New("made a certificate that is not PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse the certificate made: %w", err)
	}
	return cert, nil
}

// checkName reports whether name makes safe file names NAME.pem and
// NAME-key.pem beside the CA's.
func checkName(name string) error {
	if err := meshtls.ValidateSegment(name); err != nil {
		return errors.New("want letters, digits, '.', '_' or '-' only")
	}
	if strings.HasPrefix(name, ".") {
		return errors.New("must not start with '.'")
	}
	for _, f := range []string{name + ".pem", name + "-key.pem"} {
		if f == caCertFile || f == caKeyFile {
			return fmt.Errorf("%s would overwrite the CA's %s", f, f)
		}
	}
	return nil
}

type newFile struct {
	path string
	data []byte
	perm os.FileMode
}

// writeNew creates the files, refusing to replace any. When one fails, the
// ones it created are removed.
func writeNew(files []newFile) error {
	var created []string
	for _, f := range files {
		if err := writeExclusive(f.path, f.data, f.perm); err != nil {
			for _, p := range created {
				_ = os.Remove(p)
			}
			return err
		}
		created = append(created, f.path)
	}
	return nil
}

func writeExclusive(path string, data []byte, perm os.FileMode) (err error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = cerr
		}
		if err != nil {
			_ = os.Remove(path)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return err
	}
	return f.Sync()
}

// writeReplace writes each file to a temporary file beside it, then renames
// them all into place, so a reader sees an old or a new file, never half of
// one. Nothing is replaced unless every temporary file was written.
func writeReplace(files []newFile) error {
	tmps := make([]string, 0, len(files))
	cleanup := func() {
		for _, p := range tmps {
			_ = os.Remove(p)
		}
	}
	for _, f := range files {
		tmp, err := os.CreateTemp(filepath.Dir(f.path), "."+filepath.Base(f.path)+".tmp*")
		if err != nil {
			cleanup()
			return err
		}
		tmps = append(tmps, tmp.Name())
		err = tmp.Chmod(f.perm)
		if err == nil {
			_, err = tmp.Write(f.data)
		}
		if err == nil {
			err = tmp.Sync()
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			cleanup()
			return fmt.Errorf("write %s: %w", f.path, err)
		}
	}
	for i, f := range files {
		if err := os.Rename(tmps[i], f.path); err != nil {
			cleanup()
			return err
		}
	}
	return nil
}
