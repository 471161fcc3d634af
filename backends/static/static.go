// Package static is a read-only backend of fixed endpoints, scheme
// static://: go-zero's direct://, for development, tests and services that
// live outside any registry. A client uses the same API (Lookup, Watch, the
// gRPC resolver) as over a real registry; Register fails with an error
// wrapping errors.ErrUnsupported.
//
// URL forms:
//
//	static://10.0.0.1:8080,10.0.0.2:8080          every service has these two endpoints
//	static:///?file=/etc/rollcall/endpoints.json  endpoints per service, from a file
//
// and, as gRPC targets (see package grpcresolver):
//
//	static://10.0.0.1:8080,10.0.0.2:8080/user.rpc
//	static:///user.rpc?file=/etc/rollcall/endpoints.json
//
// In the host-list form an endpoint's ID is its address and it has no
// metadata. IPv6 addresses cannot be written in a URL's host list; use the
// file or Options.
//
// # The file
//
// The file is JSON: an object from service name to a list of endpoints, each
// either an address or an object with addr, and optionally id and metadata:
//
//	{
//	  "user.rpc": [
//	    "10.0.0.1:8080",
//	    {"addr": "10.0.0.2:8080", "id": "b", "metadata": {"zone": "eu-1a", "weight": "3"}}
//	  ]
//	}
//
// A service the file does not name has no endpoints; Registry.Services
// lists those it names with endpoints (the host-list form has no list of
// services). The file is watched
// (fsnotify, on its directory, so editors that save by renaming are seen) and
// every change reaches Lookup and every Watcher as one diff. A file that does
// not parse, holds an invalid endpoint or is removed loses nothing: the last
// good endpoints stay, the problem is logged once per change, and Ping
// reports it until the file is good again. New fails if the file is not good
// to begin with.
package static

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/fsnotify/fsnotify"

	"github.com/rollcall-go/rollcall/registry"
	"github.com/rollcall-go/rollcall/registry/driver"
)

// Scheme is the URL scheme of this backend.
const Scheme = "static"

func init() { registry.Register(Scheme, registry.URLOpenerFunc(openURL)) }

const urlForms = "static: URL forms are static://HOST:PORT[,HOST:PORT...] and static:///?file=PATH"

func openURL(_ context.Context, u *url.URL) (registry.Registry, error) {
	p := registry.NewURLParams(u)
	file := p.String("file", "")
	if err := p.Err(); err != nil {
		return nil, err
	}
	bad := func(why string) error {
		return fmt.Errorf("%w: %s: %s (%s)", registry.ErrInvalidURL, registry.RedactURL(u), why, urlForms)
	}
	switch {
	case u.User != nil:
		return nil, bad("a static registry takes no credentials")
	case u.Path != "" && u.Path != "/":
		return nil, bad("a path is not part of a static registry URL")
	case u.Host == "" && file == "":
		return nil, bad("no endpoints: give a host list or file")
	case u.Host != "" && file != "":
		return nil, bad("give a host list or file, not both")
	}
	if file != "" {
		return New(&Options{File: file})
	}
	r, err := New(&Options{Addrs: strings.Split(u.Host, ",")})
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", registry.ErrInvalidURL, registry.RedactURL(u), err)
	}
	return r, nil
}

// Options configure a static Registry. Exactly one of Addrs, Instances and
// File is set.
type Options struct {
	// Addrs are the endpoints of every service (the host-list form); each
	// one's ID is its address.
	Addrs []string
	// Instances are the endpoints, each of the service it names.
	Instances []registry.Instance
	// File is the path of a JSON file of endpoints per service (see the
	// package doc), reloaded when it changes.
	File string
	// Registry configures the shared layer (the logger, above all).
	Registry registry.Options
}

// New returns a read-only Registry of the endpoints opts gives. It fails
// with an error wrapping registry.ErrInvalidInstance for an invalid
// endpoint, and with the file's problem when File cannot be read or parsed.
func New(opts *Options) (registry.Registry, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	given := 0
	for _, set := range []bool{len(o.Addrs) > 0, len(o.Instances) > 0, o.File != ""} {
		if set {
			given++
		}
	}
	if given != 1 {
		return nil, errors.New("static: give exactly one of Options.Addrs, Options.Instances and Options.File")
	}
	log := o.Registry.Logger
	if log == nil {
		log = slog.Default()
	}
	b := &backend{log: log, changed: make(chan struct{}), done: make(chan struct{})}
	var err error
	switch {
	case len(o.Addrs) > 0:
		b.any, err = anyService(o.Addrs)
	case len(o.Instances) > 0:
		b.byService, err = byService(o.Instances)
	default:
		err = b.watchFile(o.File)
	}
	if err != nil {
		b.close()
		return nil, err
	}
	return registry.New(b, &o.Registry), nil
}

// anyService checks the endpoints of the host-list form.
func anyService(addrs []string) ([]driver.Instance, error) {
	list := make([]driver.Instance, 0, len(addrs))
	for _, a := range addrs {
		in := driver.Instance{Service: "any", ID: a, Addr: a}
		if err := registry.Instance(in).Validate(); err != nil {
			return nil, fmt.Errorf("static: endpoint %q: %w", a, err)
		}
		in.Service = ""
		list = append(list, in)
	}
	return list, nil
}

// byService checks instances and groups them by service.
func byService(insts []registry.Instance) (map[string][]driver.Instance, error) {
	m := make(map[string][]driver.Instance)
	seen := make(map[[2]string]bool)
	for _, in := range insts {
		in = in.Clone()
		if in.ID == "" {
			in.ID = in.Addr
		}
		if err := in.Validate(); err != nil {
			return nil, fmt.Errorf("static: %s: %w", in.String(), err)
		}
		k := [2]string{in.Service, in.ID}
		if seen[k] {
			return nil, fmt.Errorf("%w: static: %s/%s is given twice", registry.ErrInvalidInstance, in.Service, in.ID)
		}
		seen[k] = true
		m[in.Service] = append(m[in.Service], driver.Instance(in))
	}
	return m, nil
}

// endpoint is one entry of the file: an address, or an object.
type endpoint struct {
	Addr     string            `json:"addr"`
	ID       string            `json:"id,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

func (e *endpoint) UnmarshalJSON(data []byte) error {
	var addr string
	if err := json.Unmarshal(data, &addr); err == nil {
		*e = endpoint{Addr: addr}
		return nil
	}
	type plain endpoint
	dec := json.NewDecoder(strings.NewReader(string(data)))
	dec.DisallowUnknownFields()
	return dec.Decode((*plain)(e))
}

// parseFile reads and checks the file.
func parseFile(path string) (map[string][]driver.Instance, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("static: %w", err)
	}
	var doc map[string][]endpoint
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("static: %s: %w (want an object from service name to a list of endpoints)", path, err)
	}
	var insts []registry.Instance
	for svc, eps := range doc {
		for _, e := range eps {
			insts = append(insts, registry.Instance{Service: svc, ID: e.ID, Addr: e.Addr, Metadata: e.Metadata})
		}
	}
	m, err := byService(insts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

type backend struct {
	log  *slog.Logger
	done chan struct{} // closed by close
	wg   sync.WaitGroup
	fw   *fsnotify.Watcher

	mu        sync.Mutex
	any       []driver.Instance            // the host-list form: every service's endpoints (Service unset)
	byService map[string][]driver.Instance // otherwise
	fileErr   error                        // the file's problem, while it has one
	changed   chan struct{}                // closed and replaced on every reload
	closed    bool
}

var (
	_ driver.Backend       = (*backend)(nil)
	_ driver.Pinger        = (*backend)(nil)
	_ driver.ServiceLister = (*backend)(nil)
)

var errReadOnly = fmt.Errorf("static: a static registry is read-only: its endpoints come from its URL, Options or file: %w", errors.ErrUnsupported)

func (b *backend) Publish(context.Context, driver.Instance) (driver.Publication, error) {
	return nil, errReadOnly
}

// list returns service's endpoints and the channel closed on the next reload.
func (b *backend) list(service string) ([]driver.Instance, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.any != nil {
		list := make([]driver.Instance, len(b.any))
		for i, in := range b.any {
			in.Service = service
			list[i] = in
		}
		return list, b.changed
	}
	return slices.Clone(b.byService[service]), b.changed
}

func (b *backend) List(_ context.Context, service string) ([]driver.Instance, error) {
	list, _ := b.list(service)
	return list, nil
}

func (b *backend) Watch(_ context.Context, service string) (driver.Stream, error) {
	return &stream{b: b, service: service, stop: make(chan struct{})}, nil
}

// Ping reports the file's problem, while it has one.
// Services lists the services of the file (or Options) that have
// endpoints. The host-list form gives every service the same endpoints, so
// it has no list of services: an error wrapping errors.ErrUnsupported.
func (b *backend) Services(context.Context) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.any != nil {
		return nil, fmt.Errorf("static: every service has the URL's endpoints: there is no list of services: %w", errors.ErrUnsupported)
	}
	var out []string
	for svc, list := range b.byService {
		if len(list) > 0 {
			out = append(out, svc)
		}
	}
	return out, nil
}

func (b *backend) Ping(context.Context) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.fileErr
}

func (b *backend) Close() error {
	b.close()
	return nil
}

func (b *backend) close() {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return
	}
	b.closed = true
	b.mu.Unlock()
	close(b.done)
	if b.fw != nil {
		_ = b.fw.Close()
	}
	b.wg.Wait()
}

// watchFile loads path and reloads it on every change of it.
func (b *backend) watchFile(path string) error {
	m, err := parseFile(path)
	if err != nil {
		return err
	}
	b.byService = m
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("static: watching %s: %w", path, err)
	}
	b.fw = fw
	// The directory, not the file: an editor that saves by writing a new
	// file and renaming it over the old one replaces the watched inode.
	if err := fw.Add(filepath.Dir(path)); err != nil {
		return fmt.Errorf("static: watching %s: %w", path, err)
	}
	name := filepath.Clean(path)
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			select {
			case <-b.done:
				return
			case ev, ok := <-fw.Events:
				if !ok {
					return
				}
				if filepath.Clean(ev.Name) == name && !ev.Has(fsnotify.Chmod) {
					b.reload(path)
				}
			case err, ok := <-fw.Errors:
				if !ok {
					return
				}
				b.log.Warn("static: watching the endpoints file failed; changes may be missed", "file", path, "err", err)
			}
		}
	}()
	return nil
}

// reload reads the file again; a bad file keeps the last good endpoints.
func (b *backend) reload(path string) {
	m, err := parseFile(path)
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		if b.fileErr == nil || b.fileErr.Error() != err.Error() {
			b.log.Warn("static: the endpoints file is not good; keeping the last good endpoints", "err", err)
		}
		b.fileErr = fmt.Errorf("%w: %w", registry.ErrUnavailable, err)
		return
	}
	if b.fileErr != nil {
		b.log.Info("static: the endpoints file is good again", "file", path)
	}
	b.fileErr = nil
	b.byService = m
	close(b.changed)
	b.changed = make(chan struct{})
}

// stream delivers the service's endpoints as a Reset, and again after each
// reload.
type stream struct {
	b       *backend
	service string
	stop    chan struct{}
	once    sync.Once
	next    <-chan struct{} // nil before the first event
}

func (s *stream) Next(ctx context.Context) (driver.Event, error) {
	if s.next != nil {
		select {
		case <-s.next:
		case <-s.stop:
			return driver.Event{}, registry.ErrClosed
		case <-s.b.done:
			return driver.Event{}, registry.ErrClosed
		case <-ctx.Done():
			return driver.Event{}, ctx.Err()
		}
	}
	list, next := s.b.list(s.service)
	s.next = next
	return driver.ResetEvent(list), nil
}

func (s *stream) Close() error {
	s.once.Do(func() { close(s.stop) })
	return nil
}
