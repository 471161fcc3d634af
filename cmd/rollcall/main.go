// Command rollcall lists, watches and registers service instances in any
// registry rollcall supports, and runs a demo.
//
//	rollcall ls URL                          list the services, with their instance counts
//	rollcall ls URL SERVICE                  list the live instances of SERVICE
//	rollcall watch URL SERVICE               follow them live
//	rollcall register URL SERVICE ADDR       register one until interrupted
//	rollcall version                         print the version
//	rollcall demo                            embedded etcd + gRPC servers + client
//
// For example:
//
//	rollcall ls etcd://127.0.0.1:2379
//	rollcall ls --json consul://127.0.0.1:8500 user.rpc
//	rollcall watch --json nacos://127.0.0.1:8848 user.rpc
//	rollcall register etcd://127.0.0.1:2379 user.rpc 10.0.0.7:8080 --meta zone=eu-1
//
// URL is a registry URL such as etcd://127.0.0.1:2379; its path, where the
// scheme takes one (etcd://h:2379/team-a), is a key prefix, a namespace for
// service names, never the service itself. ls, watch and register say on
// stderr which prefix they use. Run rollcall --help for the form of each
// scheme.
//
// ls, watch, register and version take --json: ls prints a JSON array,
// watch one JSON object per update and register one per state change, a
// line each. Text is the default.
//
// Results go to stdout, errors and notes to stderr; the usage text is
// printed only for usage errors. Exit codes:
//
//	0  success (also: interrupted watch or register, after deregistering)
//	1  registry error: unreachable, refused, timed out
//	2  usage error: bad arguments, bad URL, unknown scheme, invalid instance
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"

	"github.com/rollcall-go/rollcall/registry"
)

// Exit codes.
const (
	exitOK       = 0
	exitRegistry = 1
	exitUsage    = 2
)

func main() {
	// The library and the SDKs log through slog.Default(); a command line
	// tool shows only their errors (the commands report the rest themselves).
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// cli is one run of the command.
type cli struct {
	stdout, stderr io.Writer
	flagUsage      string // the usage of the command's flags, made by its flag set
}

// usageError is an error of the command line; it exits with exitUsage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

// run is the whole command; main only adds the signal handling and exit.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	c := &cli{stdout: stdout, stderr: stderr}
	if len(args) == 0 {
		c.usage(stderr)
		return exitUsage
	}
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "-h", "-help", "--help", "help":
		c.usage(stdout)
		return exitOK
	case "ls":
		err = c.ls(ctx, rest)
	case "watch":
		err = c.watch(ctx, rest)
	case "register":
		err = c.register(ctx, rest)
	case "demo":
		err = c.demo(ctx, rest)
	case "version", "--version":
		err = c.version(rest)
	default:
		err = usagef("unknown command %q", cmd)
	}
	return c.exit(cmd, err)
}

// exit prints err and maps it to an exit code.
func (c *cli) exit(cmd string, err error) int {
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.As(err, &ue):
		fmt.Fprintf(c.stderr, "rollcall: %v\nRun 'rollcall --help' for usage.\n", err)
		return exitUsage
	case errors.Is(err, registry.ErrInvalidInstance):
		fmt.Fprintf(c.stderr, "rollcall %s: %v\n", cmd, err)
		return exitUsage
	case errors.Is(err, registry.ErrInvalidURL), errors.Is(err, registry.ErrUnknownScheme):
		fmt.Fprintf(c.stderr, "rollcall %s: %v\nRun 'rollcall --help' for the URL forms.\n", cmd, err)
		return exitUsage
	default:
		fmt.Fprintf(c.stderr, "rollcall %s: %v\n", cmd, err)
		return exitRegistry
	}
}

// urlForms documents the registry URL of each scheme rollcall knows.
var urlForms = []struct{ scheme, form, note string }{
	{"etcd", "etcd://[USER:PASSWORD@]HOST:2379[,HOST:2379...][/PREFIX][?ttl=10s&tls=true&ca=ca.pem&cert=c.pem&key=k.pem&dial-timeout=3s]",
		"keys under /rollcall/[PREFIX/]SERVICE/ID"},
	{"consul", "consul://[USER:PASSWORD@]HOST:8500[/PREFIX][?ttl=10s&dc=dc1&token=T&tls=true&ca=ca.pem&cert=c.pem&key=k.pem]",
		"the HTTP API of a Consul agent; services named PREFIX/SERVICE; ca_file, cert_file, key_file are aliases of ca, cert, key; unset settings come from CONSUL_HTTP_* (consul:/// is $CONSUL_HTTP_ADDR)"},
	{"nacos", "nacos://[USER:PASSWORD@]HOST:8848[,HOST:8848...][?namespace=NS&group=G&cluster=C&ttl=10s&timeout=5s]",
		"Nacos 2.x servers' HTTP addresses (the SDK talks gRPC to port+1000)"},
	{"k8s", "k8s://NAMESPACE[?kubeconfig=PATH&context=NAME&ttl=10s]",
		"EndpointSlices of NAMESPACE (k8s:/// is the kubeconfig's); SERVICE is NAME or NAME:PORT"},
	{"mem", "mem://NAME[?ttl=10s]", "in-process only: useful inside one process (tests, the demo), not across commands"},
	{"static", "static://HOST:PORT[,HOST:PORT...] | static:///?file=PATH",
		"read-only fixed endpoints (every service has the listed ones), or per service from a JSON file that is reloaded on change"},
}

func (c *cli) usage(w io.Writer) {
	linked := registry.DefaultURLMux().Schemes()
	fmt.Fprint(w, `rollcall: service registration and discovery over etcd, Consul, Nacos and Kubernetes.

Usage:
  rollcall ls URL [--timeout 5s] [--json]
        List the services of the registry, sorted by name, with the number of
        live instances of each.
        e.g.  rollcall ls etcd://127.0.0.1:2379
  rollcall ls URL SERVICE [--timeout 5s] [--json]
        List the live instances of SERVICE, sorted by ID.
        e.g.  rollcall ls --json consul://127.0.0.1:8500 user.rpc
  rollcall watch URL SERVICE [--json]
        Follow the instances of SERVICE: print each addition (+), change (~) and
        removal (-) as it happens, and say when the registry is unreachable (the
        list shown is then the last one known, kept, not emptied). Until Ctrl-C.
        With --json, one JSON object per update: time, stale, synced, error,
        instances, and the added, changed and removed IDs.
        e.g.  rollcall watch etcd://127.0.0.1:2379 user.rpc
  rollcall register URL SERVICE ADDR [--id ID] [--meta k=v]... [--ttl 10s] [--timeout 5s] [--json]
        Register SERVICE at ADDR (host:port) and keep it registered (renewing
        its lease, registering again after the registry loses it) until Ctrl-C,
        then deregister. --id defaults to ADDR; --ttl sets the URL's ttl. With
        --json, one JSON object per state change (event: registered, lost,
        registered-again, deregistered).
        e.g.  rollcall register etcd://127.0.0.1:2379 user.rpc 10.0.0.7:8080 --meta zone=eu-1
  rollcall version [--json]
        Print rollcall's module version ("(devel)" for a build from a
        checkout) and the Go version it was built with.
        e.g.  rollcall version
  rollcall demo
        Start an embedded etcd, a few gRPC servers that register themselves and
        a client that balances calls across them through etcd://; crash a
        server, stop and restart etcd, and tell what happened. About 40s.
        e.g.  rollcall demo

Flags may come before or after the arguments.

Registry URLs:
`)
	for _, f := range urlForms {
		mark := "  (not linked into this build)"
		if slices.Contains(linked, f.scheme) {
			mark = ""
		}
		fmt.Fprintf(w, "  %s%s\n      %s\n", f.form, mark, f.note)
	}
	for _, s := range linked {
		if !slices.ContainsFunc(urlForms, func(f struct{ scheme, form, note string }) bool { return f.scheme == s }) {
			fmt.Fprintf(w, "  %s://...\n", s)
		}
	}
	fmt.Fprint(w, `  The path of an etcd or Consul URL (etcd://HOST:2379/team-a) is a key prefix,
  a namespace for service names: not a service name. Parameters not listed for
  a scheme are rejected. Passwords and tokens never appear in messages.

gRPC clients use the same URL with the service as its last path segment,
e.g. etcd://127.0.0.1:2379/user.rpc (see package grpcresolver).

Results go to stdout; errors and notes to stderr.

Exit codes:
  0  success; also an interrupted watch, or register after it deregistered
  1  registry error: unreachable, timed out, refused the request
  2  usage error: bad arguments, bad or unknown URL, invalid service or address
`)
}

// parseArgs parses flags that may come before, between or after the
// positional arguments, and returns the positional ones.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// newFlagSet returns a flag set whose errors are usage errors and whose
// -help prints the command's usage to stdout (see parse).
func (c *cli) newFlagSet(name, synopsis string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		// Called for -help and for bad flags alike; parse prints it for
		// -help only: a bad flag gets its error and a hint, on stderr.
		var b strings.Builder
		fmt.Fprintf(&b, "Usage: rollcall %s\n", synopsis)
		fs.SetOutput(&b)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
		fmt.Fprintln(&b, "Run 'rollcall --help' for the URL forms and exit codes.")
		c.flagUsage = b.String()
	}
	return fs
}

// parse parses args into fs and checks the number of positional arguments.
// Names in brackets ("[SERVICE]") are optional and come last.
func (c *cli) parse(fs *flag.FlagSet, args []string, names ...string) ([]string, error) {
	pos, err := parseArgs(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(c.stdout, c.flagUsage)
		return nil, err
	}
	if err != nil {
		return nil, usagef("%s: %v", fs.Name(), err)
	}
	required := 0
	for _, n := range names {
		if !strings.HasPrefix(n, "[") {
			required++
		}
	}
	if len(pos) < required || len(pos) > len(names) {
		return nil, usagef("%s: want %s, got %d argument(s)", fs.Name(), strings.Join(names, " "), len(pos))
	}
	return pos, nil
}

// open opens a registry URL and checks the service name (unless it is
// empty); both are usage errors when wrong. When the URL has a path, which
// is a key prefix (namespace) and easily mistaken for a service name, it
// says so on stderr.
func (c *cli) open(ctx context.Context, cmd, rawURL, service string) (registry.Registry, error) {
	if service != "" {
		if err := registry.ValidateServiceName(service); err != nil {
			return nil, err
		}
	}
	known := strings.Join(registry.Schemes(), ", ")
	u, perr := url.Parse(rawURL)
	if !strings.Contains(rawURL, "://") && (perr != nil || !registry.DefaultURLMux().ValidScheme(u.Scheme)) {
		// Redacted as the authority it probably is ("user:pw@host:port").
		shown := strings.TrimPrefix(registry.Redact("etcd://"+strings.TrimPrefix(rawURL, "//")), "etcd://")
		return nil, usagef("%s: %q is not a registry URL: it has no scheme (want SCHEME://..., e.g. etcd://%s; known schemes: %s)",
			cmd, shown, shown, known)
	}
	r, err := registry.Open(ctx, rawURL)
	if err != nil {
		if errors.Is(err, registry.ErrUnknownScheme) {
			return nil, fmt.Errorf("%w; this build knows %s", err, known)
		}
		return nil, err
	}
	if prefix := strings.Trim(u.Path, "/"); prefix != "" {
		fmt.Fprintf(c.stderr, "rollcall %s: registry prefix %q (from the URL path: a namespace for service names, not a service name)\n", cmd, prefix)
	}
	return r, nil
}
