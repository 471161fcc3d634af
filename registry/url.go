package registry

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// URLOpener opens a Registry from a URL. Backends implement it and register
// it with a URLMux, usually the default one from their init function.
type URLOpener interface {
	OpenRegistryURL(ctx context.Context, u *url.URL) (Registry, error)
}

// URLOpenerFunc adapts a function to URLOpener.
type URLOpenerFunc func(ctx context.Context, u *url.URL) (Registry, error)

// OpenRegistryURL calls f.
func (f URLOpenerFunc) OpenRegistryURL(ctx context.Context, u *url.URL) (Registry, error) {
	return f(ctx, u)
}

// URLMux maps URL schemes to openers. The zero value is ready to use and is
// safe for concurrent use.
type URLMux struct {
	mu      sync.RWMutex
	openers map[string]URLOpener
}

// Register makes opener open URLs of scheme. It panics if scheme is empty,
// not lower case, not a valid URL scheme, already registered, or opener is nil.
func (m *URLMux) Register(scheme string, opener URLOpener) {
	if opener == nil {
		panic("registry: Register opener is nil")
	}
	if !validScheme(scheme) {
		panic(fmt.Sprintf("registry: Register of invalid scheme %q (want lower case letters, digits, + - .)", scheme))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, dup := m.openers[scheme]; dup {
		panic(fmt.Sprintf("registry: Register called twice for scheme %q", scheme))
	}
	if m.openers == nil {
		m.openers = make(map[string]URLOpener)
	}
	m.openers[scheme] = opener
}

// Schemes returns the registered schemes, sorted.
func (m *URLMux) Schemes() []string {
	m.mu.RLock()
	defer m.mu.RUnlock()
	s := make([]string, 0, len(m.openers))
	for k := range m.openers {
		s = append(s, k)
	}
	slices.Sort(s)
	return s
}

// ValidScheme reports whether scheme has a registered opener.
func (m *URLMux) ValidScheme(scheme string) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	_, ok := m.openers[scheme]
	return ok
}

// Open parses rawURL and opens it with the opener of its scheme. It does not
// block on the network; use Ping to check that the registry answers.
// Credentials in the URL never appear in the error.
func (m *URLMux) Open(ctx context.Context, rawURL string) (Registry, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("%w: %q does not parse", ErrInvalidURL, Redact(rawURL))
	}
	return m.OpenURL(ctx, u)
}

// OpenURL is Open for a parsed URL.
func (m *URLMux) OpenURL(ctx context.Context, u *url.URL) (Registry, error) {
	if u.Scheme == "" {
		return nil, fmt.Errorf("%w: %q has no scheme (want e.g. etcd://127.0.0.1:2379)", ErrInvalidURL, RedactURL(u))
	}
	m.mu.RLock()
	opener := m.openers[u.Scheme]
	m.mu.RUnlock()
	if opener == nil {
		return nil, fmt.Errorf("%w %q (forgotten import?)", ErrUnknownScheme, u.Scheme)
	}
	u, snap, err := snapshotParams(u)
	if err != nil {
		return nil, err
	}
	reg, err := opener.OpenRegistryURL(ctx, u)
	if err != nil || snap.Dir == "" {
		return reg, err
	}
	r := unwrap(reg)
	if r == nil {
		_ = reg.Close()
		return nil, fmt.Errorf("%w: %s: the %s backend's registry does not take snapshot parameters", ErrInvalidURL, RedactURL(u), u.Scheme)
	}
	r.opts.Snapshot = snap.withDefaults() // no Watcher exists yet
	return reg, nil
}

// unwrap returns the registry made by New under reg, which a backend may
// wrap in a type of its own with an Unwrap method; nil if there is none.
func unwrap(reg Registry) *registry {
	for range 8 {
		switch r := reg.(type) {
		case *registry:
			return r
		case interface{ Unwrap() Registry }:
			reg = r.Unwrap()
		default:
			return nil
		}
	}
	return nil
}

// snapshotParams takes the parameters every scheme accepts, snapshot=DIR,
// snapshot_max_age and snapshot_wait, out of u: it returns u without them and
// the Snapshot they set, keyed by the rest of the URL, redacted.
func snapshotParams(u *url.URL) (*url.URL, Snapshot, error) {
	q := u.Query()
	if !q.Has("snapshot") && !q.Has("snapshot_max_age") && !q.Has("snapshot_wait") {
		return u, Snapshot{}, nil
	}
	p := NewURLParams(u)
	s := Snapshot{Dir: p.String("snapshot", ""), MaxAge: p.Duration("snapshot_max_age", 0), Wait: p.Duration("snapshot_wait", 0)}
	for k := range p.used {
		q.Del(k)
	}
	if err := p.err; err != nil {
		return nil, Snapshot{}, err
	}
	if s.Dir == "" {
		return nil, Snapshot{}, fmt.Errorf("%w: %s: snapshot_max_age and snapshot_wait need snapshot=DIR", ErrInvalidURL, RedactURL(u))
	}
	c := *u
	c.RawQuery = q.Encode()
	s.Key = RedactURL(&c)
	return &c, s, nil
}

func validScheme(s string) bool {
	if s == "" || !(s[0] >= 'a' && s[0] <= 'z') {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

var defaultMux = new(URLMux)

// DefaultURLMux returns the URLMux used by Open and Register.
func DefaultURLMux() *URLMux { return defaultMux }

// Open opens a registry by URL through the default URLMux, e.g.
// "etcd://10.0.0.1:2379,10.0.0.2:2379/?ttl=10s". The backend for the scheme
// must be linked in, usually with a blank import:
//
//	import _ "github.com/rollcall-go/rollcall/backends/etcd"
func Open(ctx context.Context, rawURL string) (Registry, error) {
	return defaultMux.Open(ctx, rawURL)
}

// Register registers opener for scheme with the default URLMux. Backends call
// it from init.
func Register(scheme string, opener URLOpener) { defaultMux.Register(scheme, opener) }

// Schemes returns the schemes registered with the default URLMux, sorted:
// those of the backends linked into the program.
func Schemes() []string { return defaultMux.Schemes() }

// Redact returns rawURL with any password, and the values of query
// parameters that carry secrets (token, password, secret, key), replaced by
// "xxxxx". Use it whenever a URL goes into an error or a log line.
func Redact(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		// Not parsable: keep only what cannot hold credentials.
		if i := strings.IndexAny(rawURL, "@?"); i >= 0 {
			return rawURL[:min(i, strings.Index(rawURL, "://")+3)] + "…"
		}
		return rawURL
	}
	return RedactURL(u)
}

// RedactURL is Redact for a parsed URL.
func RedactURL(u *url.URL) string {
	c := *u
	if c.User != nil {
		c.User = url.User(c.User.Username())
		if _, has := u.User.Password(); has {
			c.User = url.UserPassword(c.User.Username(), "xxxxx")
		}
	}
	if c.RawQuery != "" {
		q := c.Query()
		for k := range q {
			if secretParam(k) {
				q.Set(k, "xxxxx")
			}
		}
		c.RawQuery = q.Encode()
	}
	return c.String()
}

func secretParam(k string) bool {
	k = strings.ToLower(k)
	for _, s := range []string{"token", "password", "secret", "key", "passwd"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return false
}

// URLParams reads a URL's query parameters for an opener and rejects the ones
// it did not read. Typical use:
//
//	p := registry.NewURLParams(u)
//	ttl := p.Duration("ttl", driver.DefaultTTL)
//	prefix := p.String("prefix", "")
//	if err := p.Err(); err != nil { return nil, err }
type URLParams struct {
	u    *url.URL
	q    url.Values
	used map[string]bool
	err  error
}

// NewURLParams returns the parameters of u.
func NewURLParams(u *url.URL) *URLParams {
	return &URLParams{u: u, q: u.Query(), used: map[string]bool{}}
}

func (p *URLParams) fail(key, format string, args ...any) {
	if p.err == nil {
		p.err = fmt.Errorf("%w: %s: parameter %q: %s", ErrInvalidURL, RedactURL(p.u), key, fmt.Sprintf(format, args...))
	}
}

func (p *URLParams) get(key string) (string, bool) {
	p.used[key] = true
	vs, ok := p.q[key]
	if !ok {
		return "", false
	}
	if len(vs) > 1 {
		p.fail(key, "given %d times", len(vs))
	}
	return vs[0], true
}

// String returns the parameter's value, or def when absent.
func (p *URLParams) String(key, def string) string {
	if v, ok := p.get(key); ok {
		return v
	}
	return def
}

// Duration returns the parameter as a positive time.Duration ("10s"), or def.
func (p *URLParams) Duration(key string, def time.Duration) time.Duration {
	v, ok := p.get(key)
	if !ok {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		p.fail(key, "%q is not a positive duration such as 10s", v)
		return def
	}
	return d
}

// Bool returns the parameter as a bool ("true", "false", "1", "0"), or def.
func (p *URLParams) Bool(key string, def bool) bool {
	v, ok := p.get(key)
	if !ok {
		return def
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		p.fail(key, "%q is not true or false", v)
		return def
	}
	return b
}

// Err returns the first bad value, or an error naming the parameters that
// were given but never read, or nil.
func (p *URLParams) Err() error {
	if p.err != nil {
		return p.err
	}
	var unknown []string
	for k := range p.q {
		if !p.used[k] {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		slices.Sort(unknown)
		known := make([]string, 0, len(p.used))
		for k := range p.used {
			known = append(known, k)
		}
		slices.Sort(known)
		return fmt.Errorf("%w: %s: unknown parameter %q (known: %s)", ErrInvalidURL, RedactURL(p.u), strings.Join(unknown, ", "), strings.Join(known, ", "))
	}
	return nil
}
