package routing_test

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestPurity fails when package routing does I/O, reads the clock, logs,
// exports metrics, starts goroutines or imports another cellmesh package:
// routing is the pure model, and callers pass now.
func TestPurity(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		checked++
		for _, v := range purityViolations(t, name, nil) {
			t.Error(v)
		}
	}
	if checked == 0 {
		t.Fatal("no routing source file found")
	}
}

// TestPurityCatches proves the check finds each forbidden thing.
func TestPurityCatches(t *testing.T) {
	src := `package routing
import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"log/slog"
	clock "time"
	"github.com/cellmesh/cellmesh/failover"
)
func f() {
	_ = clock.Now()
	go f()
	fmt.Println(net.IPv4len, os.Args, slog.Info, failover.X, netip.Addr{})
}
`
	got := strings.Join(purityViolations(t, "impure.go", src), "\n")
	for _, want := range []string{`imports "net"`, `imports "os"`, `imports "log/slog"`, `imports "github.com/cellmesh/cellmesh/failover"`, "time.Now reads the clock", "goroutines", "fmt.Println"} {
		if !strings.Contains(got, want) {
			t.Errorf("violations miss %q; got:\n%s", want, got)
		}
	}
	if strings.Contains(got, `imports "net/netip"`) {
		t.Errorf("net/netip is allowed, got:\n%s", got)
	}
}

func purityViolations(t *testing.T, name string, src any) []string {
	t.Helper()
	forbiddenImport := func(p string) string {
		switch {
		case p == "net/netip":
			return ""
		case p == "net" || strings.HasPrefix(p, "net/"):
			return "network access (use net/netip for addresses)"
		case p == "os" || strings.HasPrefix(p, "os/"), p == "io/ioutil", p == "io/fs", p == "syscall", p == "path/filepath":
			return "file or process access"
		case p == "log" || strings.HasPrefix(p, "log/"):
			return "logging"
		case strings.HasPrefix(p, "github.com/prometheus/"):
			return "metrics"
		case p == "math/rand" || strings.HasPrefix(p, "math/rand/") || p == "crypto/rand":
			return "randomness (plans must be deterministic)"
		case p == "unsafe":
			return "unsafe"
		case strings.HasPrefix(p, "github.com/cellmesh/cellmesh"):
			return "another cellmesh package"
		}
		return ""
	}
	clock := map[string]bool{"Now": true, "Since": true, "Until": true, "Sleep": true, "After": true, "AfterFunc": true, "Tick": true, "NewTimer": true, "NewTicker": true}
	printing := map[string]bool{"Print": true, "Printf": true, "Println": true}
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, name, src, 0)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	names := map[string]string{} // local name -> import path
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		if why := forbiddenImport(p); why != "" {
			out = append(out, fmt.Sprintf("%s imports %q: routing must not do %s", fset.Position(imp.Pos()), p, why))
		}
		local := p[strings.LastIndex(p, "/")+1:]
		if imp.Name != nil {
			local = imp.Name.Name
		}
		names[local] = p
	}
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.GoStmt:
			out = append(out, fmt.Sprintf("%s: routing must not start goroutines", fset.Position(n.Pos())))
		case *ast.SelectorExpr:
			id, ok := n.X.(*ast.Ident)
			if !ok {
				return true
			}
			switch names[id.Name] {
			case "time":
				if clock[n.Sel.Name] {
					out = append(out, fmt.Sprintf("%s: time.%s reads the clock; take now as a parameter", fset.Position(n.Pos()), n.Sel.Name))
				}
			case "fmt":
				if printing[n.Sel.Name] {
					out = append(out, fmt.Sprintf("%s: fmt.%s writes to stdout; return strings", fset.Position(n.Pos()), n.Sel.Name))
				}
			}
		}
		return true
	})
	return out
}
