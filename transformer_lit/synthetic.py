"""The built-in synthetic translation task: an English-like source and a German-like target language.

The corpus is a pure function of (seed, sizes), generated in pure Python in about a second, so the tiny
scale needs no file and no download. It is a translation task on which Table 3's knobs matter, not a copy
task: no target word is spelled like a source word, and the transduction needs attention to distant words.

Source grammar (lowercase English; 213 nouns drawn with a long Zipf tail, 101 verbs, 63 adjectives, 37
adverbs, 17 prepositions, 11 conjunctions):

    S      -> [SUB ,] [TIME_ADV] CLAUSE [that-CLAUSE] [SUB] [and S | , but S] .
    CLAUSE -> NP VG [NP] (PREP NP)* [ADV]    VG: sees | saw | will/can/must [not] see | do/does/did not see
           |  NP is/was/will be ADJ           SUB -> because/when/if/although/while/... CLAUSE
    NP     -> DET ADJ* N (of NP | PREP NP)* | DET ADJ* N that/who/which REL | PRONOUN | NP and NP

Target rules (the fixed transduction):
  * Words: mostly one for one; one-to-many: tonight -> heute abend, simple past -> perfect (saw -> hat ...
    gesehen), invite -> lädt ... ein; many-to-one: inside/to/from/near the -> im/zum/vom/beim (masculine
    and neuter), of the -> des, a lot of -> viele, by chance -> zufällig, call back -> zurückrufen.
  * Order: main clauses are verb-second (a fronted adverb or clause puts the finite verb before the subject);
    participles, infinitives and separable particles go to the clause end; subordinate and relative clauses
    are verb-final ("..., weil der mann den hund gesehen hat"); time adverbs move before the objects,
    pronoun objects before them, "nicht" and manner adverbs after; commas surround every subordinate clause.
  * Agreement: articles and adjective endings follow the gender (learnt per noun), number and case
    (subject, object, preposition) of a noun that comes after them; the finite verb agrees with its subject
    (in the past tense only the subject, maybe far away, tells the number); relative pronouns take the gender
    and number of their head noun; "it" becomes er/sie/es after the gender of the nearest preceding singular
    inanimate noun.
  * Ambiguity: bank, bat, plant, letter, key, bill and court have two translations, chosen by whether the
    sentence has a word of a context class (nature, sport, school, music); "run" is laufen with an animate
    subject, else funktionieren; "when" is als in the past, else wenn; "that" is dass or a relative pronoun.

Example pair (one tree, rendered in both languages; see tests/test_corpora.py):
    because the farmer saw the big bank near the river, he will call back the old teacher tomorrow.
    weil der bauer das große ufer beim fluss gesehen hat, wird er morgen den alten lehrer zurückrufen.

Train and dev sentences have 4 to 30 source tokens (words and punctuation marks), test sentences 31 to 50,
so the test split measures length generalisation (Table 3, row E). No source sentence occurs twice, and
sentences where English leaves open which clause an adjunct belongs to are not used.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

VERSION = 1
"""Bump whenever the generated corpus changes, so caches keyed by ``corpora.corpus_key`` are retired."""
TRAIN_LENGTHS = (4, 30)
"""Source tokens (words and punctuation marks) of train and dev sentences."""
TEST_LENGTHS = (31, 50)
"""Source tokens of test sentences: all longer than any training sentence."""

# ----------------------------------------------------------------------------------------------------------
# Lexicon. Nouns: "class en[/plural]:de[/plural]:gender"; class p person, a animal (both animate); context
# classes for the ambiguous nouns: n nature, o sport, s school, u music, m money; h home and c city have none.

_NOUNS = """
p man/men:mann/männer:m woman/women:frau:f child/children:kind/kinder:n boy:junge:m girl:mädchen:n
p teacher:lehrer:m doctor:arzt/ärzte:m farmer:bauer/bauern:m baker:bäcker:m king:könig:m queen:königin:f
p soldier:soldat/soldaten:m neighbour:nachbar/nachbarn:m friend:freund:m sister:schwester:f
p brother:bruder/brüder:m mother:mutter/mütter:f father:vater/väter:m uncle:onkel:m aunt:tante:f
p thief/thieves:dieb:m guest:gast/gäste:m waiter:kellner:m painter:maler:m poet:dichter:m priest:pfarrer:m
p mayor:bürgermeister:m servant:diener:m captain:kapitän:m sailor:matrose/matrosen:m nurse:pflegerin:f
p wife/wives:ehefrau:f husband:ehemann/ehemänner:m prince:prinz/prinzen:m princess:prinzessin:f
p judge:richter:m lawyer:anwalt/anwälte:m witness:zeuge:m
pn fisherman/fishermen:fischer:m hunter:jäger:m
ps pupil:schüler:m
po player:spieler:m coach:trainer:m referee:schiedsrichter:m
pu singer:sänger:m musician:musiker:m dancer:tänzerin:f drummer:trommler:m
pm customer:kunde:m merchant:händler:m banker:bankier/bankiers:m clerk:schreiber:m
an dog:hund:m cat:katze:f horse:pferd:n cow:kuh/kühe:f bird:vogel/vögel:m fish/fishes:fisch:m
an mouse/mice:maus/mäuse:f duck:ente:f goat:ziege:f pig:schwein:n fox:fuchs/füchse:m bear:bär/bären:m
an rabbit:hase:m frog:frosch/frösche:m snake:schlange:f owl:eule:f bee:biene:f lion:löwe:m donkey:esel:m
an chicken:huhn/hühner:n goose/geese:gans/gänse:f spider:spinne:f crow:krähe:f swan:schwan/schwäne:m
an eagle:adler:m squirrel:eichhörnchen:n hedgehog:igel:m
n river:fluss/flüsse:m sea:meer:n tree:baum/bäume:m forest:wald/wälder:m mountain:berg:m hill:hügel:m
n stone:stein:m flower:blume:f field:feld/felder:n meadow:wiese:f island:insel:f valley:tal/täler:n
n boat:boot:n grass:gras/gräser:n leaf/leaves:blatt/blätter:n rock:fels/felsen:m cave:höhle:f sun:sonne:f
n moon:mond:m star:stern:m cloud:wolke:f pond:teich:m beach:strand/strände:m storm:sturm/stürme:m
m money:geld/gelder:n coin:münze:f price:preis:m wallet:geldbörse:f account:konto/konten:n loan:kredit:m
m debt:schuld:f cheque:scheck/schecks:m salary:gehalt/gehälter:n tax:steuer:f shop:laden/läden:m
m market:markt/märkte:m ticket:fahrkarte:f receipt:quittung:f contract:vertrag/verträge:m
m treasure:schatz/schätze:m purse:beutel:m
h house:haus/häuser:n table:tisch:m chair:stuhl/stühle:m bed:bett/betten:n door:tür:f window:fenster:n
h kitchen:küche:f room:zimmer:n garden:garten/gärten:m roof:dach/dächer:n wall:mauer:f lamp:leuchte:f
h cup:tasse:f plate:teller:m spoon:löffel:m knife/knives:messer:n bottle:flasche:f box:kiste:f
h mirror:spiegel:m clock:uhr:f blanket:decke:f carpet:teppich:m candle:kerze:f basket:korb/körbe:m
h bucket:eimer:m bread:brot:n apple:apfel/äpfel:m cake:kuchen:m soup:suppe:f cheese:käse/käse:m
h egg:ei/eier:n milk:milch:f wine:wein:m coffee:kaffee/kaffees:m tea:tee/tees:m meat:fleisch:n
h sausage:wurst/würste:f
c city:stadt/städte:f street:straße:f car:wagen:m train:zug/züge:m bridge:brücke:f church:kirche:f
c castle:burg:f village:dorf/dörfer:n station:bahnhof/bahnhöfe:m hospital:krankenhaus/krankenhäuser:n
c tower:turm/türme:m ship:schiff:n road:weg:m library:bücherei:f prison:gefängnis/gefängnisse:n
s book:buch/bücher:n pen:stift:m page:seite:f word:wort/wörter:n question:frage:f answer:antwort:f
s lesson:lektion:f exam:prüfung:f story:geschichte:f map:karte:f picture:bild/bilder:n paper:papier:n
s newspaper:zeitung:f school:schule:f blackboard:tafel:f
o game:spiel:n team:mannschaft:f goal:tor:n match:partie:f race:rennen:n trophy:pokal:m whistle:pfeife:f
o net:netz:n helmet:helm:m stadium:stadion/stadien:n
u song:lied/lieder:n piano:klavier:n guitar:gitarre:f drum:trommel:f violin:geige:f concert:konzert:n
u choir:chor/chöre:m melody:melodie:f orchestra:kapelle:f
"""
# Ambiguous nouns: en, context class, translation when the sentence has a word of that class, else.
_AMBIGUOUS = """
bank n ufer:n geldhaus/geldhäuser:n bat o schläger:m fledermaus/fledermäuse:f plant n pflanze:f werk:n
letter s buchstabe:m brief:m key u tonart:f schlüssel:m bill n schnabel/schnäbel:m rechnung:f court o
spielfeld/spielfelder:n gericht:n
"""
# Verbs: en,past,de_infinitive,participle,present 2/3sg stem (empty: regular). "_" joins English words;
# "|" splits off a separable particle; "*": perfect with sein. Kinds: t transitive, i intransitive, c clause.
_VERBS = """
t see,saw,sehen,gesehen,sieh find,found,finden,gefunden buy,bought,kaufen sell,sold,verkaufen
t pay,paid,bezahlen count,,zählen visit,,besuchen love,,lieben hate,,hassen need,,brauchen fetch,,holen
t cook,,kochen clean,,putzen paint,,malen build,built,bauen ask,,fragen greet,,grüßen praise,,loben
t kiss,,küssen feed,fed,füttern chase,,jagen catch,caught,fangen,gefangen,fäng play,,spielen learn,,lernen
t teach,taught,lehren show,,zeigen wake,woke,wecken rescue,,retten protect,,schützen
t carry,,tragen,getragen,träg repair,,reparieren open,,öffnen close,,schließen,geschlossen
t take,took,nehmen,genommen,nimm eat,ate,essen,gegessen,iss drink,drank,trinken,getrunken
t write,wrote,schreiben,geschrieben forget,forgot,vergessen,vergessen,vergiss lose,lost,verlieren,verloren
t win,won,gewinnen,gewonnen throw,threw,werfen,geworfen,wirf meet,met,treffen,getroffen,triff
t call,,rufen,gerufen kick,,treten,getreten,tritt study,,studieren borrow,,leihen,geliehen
t steal,stole,stehlen,gestohlen,stiehl hear,heard,hören draw,drew,zeichnen watch,,beobachten
t follow,,verfolgen hide,hid,verstecken look_for,,suchen call_back,,zurück|rufen,zurückgerufen
t give_back,gave_back,zurück|geben,zurückgegeben,gib pick_up,,auf|heben,aufgehoben reject,,ab|lehnen
t write_down,wrote_down,auf|schreiben,aufgeschrieben throw_away,threw_away,weg|werfen,weggeworfen,wirf
t clean_up,,auf|räumen switch_off,,aus|schalten invite,,ein|laden,eingeladen,läd
t take_along,took_along,mit|nehmen,mitgenommen,nimm
i sleep,slept,schlafen,geschlafen,schläf laugh,,lachen cry,,weinen wait,,warten work,,arbeiten dance,,tanzen
i sing,sang,singen,gesungen swim,swam,schwimmen*,geschwommen come,came,kommen*,gekommen
i go,went,gehen*,gegangen fly,flew,fliegen*,geflogen fall,fell,fallen*,gefallen,fäll
i grow,grew,wachsen*,gewachsen,wächs travel,,reisen* jump,,springen*,gesprungen climb,,klettern*
i shout,,schreien,geschrien smile,,lächeln fish,,fischen hurry,,eilen*
i arrive,,ein|treffen*,eingetroffen,triff get_up,got_up,auf|stehen*,aufgestanden
i go_out,went_out,aus|gehen*,ausgegangen depart,,ab|fahren*,abgefahren,fähr
i come_back,came_back,zurück|kommen*,zurückgekommen wake_up,woke_up,auf|wachen*
i fall_asleep,fell_asleep,ein|schlafen*,eingeschlafen,schläf
c say,said,sagen think,thought,denken,gedacht believe,,glauben hope,,hoffen notice,,bemerken
c claim,,behaupten fear,,fürchten explain,,erklären report,,berichten dream,,träumen
"""
_VERB_CLASSES = """
m:buy m:sell m:pay m:count m:borrow m:steal s:learn s:teach s:write s:write_down s:study o:win o:throw
o:kick u:dance u:sing n:swim n:grow n:climb n:fish
"""
_ADJECTIVES = """
big:groß small:klein old:alt young:jung new:neu red:rot blue:blau green:grün black:schwarz white:weiß
yellow:gelb brown:braun grey:grau happy:glücklich sad:traurig hungry:hungrig tired:müde angry:wütend
quiet:leise loud:laut beautiful:schön ugly:hässlich rich:reich poor:arm clever:klug stupid:dumm brave:mutig
lazy:faul strong:stark weak:schwach friendly:freundlich cold:kalt hot:heiß dark:dunkel bright:hell long:lang
short:kurz heavy:schwer light:leicht fast:schnell slow:langsam cheap:billig expensive:teuer famous:berühmt
strange:seltsam empty:leer dangerous:gefährlich full:voll clean:sauber dirty:schmutzig wet:nass dry:trocken
sick:krank proud:stolz lonely:einsam honest:ehrlich polite:höflich deep:tief round:rund sweet:süß
sharp:scharf soft:weich careful:vorsichtig
"""
# Adverbs: T time (may be fronted; placed before the objects in German), M manner (placed after them).
_ADVERBS = """
T yesterday=gestern today=heute tomorrow=morgen tonight=heute_abend now=jetzt often=oft sometimes=manchmal
T always=immer already=schon soon=bald later=später again=noch_einmal every_day=jeden_tag
T last_year=letztes_jahr at_night=nachts this_morning=heute_früh recently=neulich
M quickly=schnell slowly=langsam carefully=vorsichtig loudly=laut quietly=leise suddenly=plötzlich
M finally=endlich gladly=gern together=zusammen alone=allein happily=fröhlich very_much=sehr
M by_chance=zufällig at_once=sofort on_purpose=absichtlich right_away=sofort of_course=natürlich
M probably=wahrscheinlich at_home=daheim secretly=heimlich
"""
# Prepositions: en=de:case (D dative, A accusative, G genitive); "*": also modifies nouns.
_PREPOSITIONS = """
with=mit:D* near=bei:D* from=von:D* to=zu:D inside=in:D* after=nach:D behind=hinter:D* under=unter:D*
next_to=neben:D* before=vor:D for=für:A* without=ohne:A* against=gegen:A through=durch:A around=um:A
because_of=wegen:G during=während:G
"""
_CONJUNCTIONS = """because=weil when=als/wenn if=wenn although=obwohl while=während before=bevor after=nachdem
until=bis as_soon_as=sobald so_that=damit even_though=obwohl"""


def _table(spec: str) -> tuple:
    """ "a b | c d" -> (("a", "b"), ("c", "d")); "-" is the empty string."""
    return tuple(tuple(w.replace("-", "") for w in row.split()) for row in spec.split("|"))


def _pairs(spec: str) -> dict[str, str]:
    return dict(item.split("=") for item in spec.split())


# German inflection: rows are cases (nominative, accusative, dative, genitive), columns m, f, n, plural.
NOM, ACC, DAT, GEN = 0, 1, 2, 3
_DEF = _table("der die das die | den die das die | dem der dem den | des der des der")
_DIES = _table("er e es e | en e es e | em er em en | es er es er")  # dieser
_EIN = _table("- e - e | en e - e | em er em en | es er es er")  # ein, kein, mein, ...
_WEAK = _table("e e e en | en e e en | en en en en | en en en en")  # adjective after der / dieser
_MIXED = _table("er e es en | en e es en | en en en en | en en en en")  # adjective after ein / mein
_STRONG_PL = ("e", "e", "en", "er")  # adjective (and viel-, einig-) with no article: plural only
_CONTRACTIONS = {("in", "dem"): "im", ("zu", "dem"): "zum", ("zu", "der"): "zur", ("von", "dem"): "vom"}
_CONTRACTIONS[("bei", "dem")] = "beim"
_POSSESSIVES = ("my", "his", "her", "our", "their", "your")
_DET_DE = _pairs("this=dies a=ein no=kein my=mein his=sein her=ihr our=unser their=ihr your=dein two=zwei")
_DET_DE |= _pairs("three=drei many=viel a_lot_of=viel some=einig")
# Persons 0 1sg, 1 2sg, 2 3sg, 3 1pl, 4 3pl; English "you" is always du.
_PRON_PERSON = {"i": 0, "you": 1, "he": 2, "she": 2, "it": 2, "we": 3, "they": 4}
_PRON_EN = dict(zip(_PRON_PERSON, _table("i me|you you|he him|she her|it it|we us|they them"), strict=True))
_PRON_DE = _table("ich mich mir|du dich dir|er ihn ihm|sie sie ihr|- - -|wir uns uns|sie sie ihnen")
_PRON_DE = dict(zip(_PRON_PERSON, _PRON_DE, strict=True))  # "it" depends on its antecedent: _IT_DE
_IT_DE = _table("er ihn ihm | sie sie ihr | es es ihm")  # "it" by the gender of its antecedent
_HABEN, _SEIN, _WAR = _table("habe hast hat haben haben | bin bist ist sind sind | war warst war waren waren")
_WERDEN, _KANN, _MUSS = _table(
    "werde wirst wird werden werden | kann kannst kann können können | muss musst muss müssen müssen"
)
_MODAL_DE = {"fut": _WERDEN, "can": _KANN, "must": _MUSS}
_MODAL_EN = {"fut": "will", "can": "can", "must": "must"}
_BE_EN, _WAS_EN, _DO_EN = _table("am are is are are | was were was were were | do do does do do")
_EN_PARTICLES = ("up", "back", "down", "away", "off", "along")
_VOWELS = "aeiouäöü"


def _en_plural(w: str) -> str:
    if w.endswith(("s", "x", "ch", "sh")):
        return w + "es"
    return w[:-1] + "ies" if w.endswith("y") and w[-2] not in _VOWELS else w + "s"


def _en_past(w: str) -> str:
    if w.endswith("e"):
        return w + "d"
    return w[:-1] + "ied" if w.endswith("y") and w[-2] not in _VOWELS else w + "ed"


def _de_plural(stem: str, g: int) -> str:
    if g == 1:
        return stem + ("nen" if stem.endswith("in") else "n" if stem.endswith(("e", "el", "er")) else "en")
    if stem.endswith(("er", "el", "en")) and not stem.endswith(("eer", "ier")):
        return stem
    return stem + ("n" if stem.endswith("e") else "e")


class Noun:
    """A noun: English singular/plural, German forms, gender g (0 m, 1 f, 2 n), animacy, context classes."""

    __slots__ = ("en", "en_pl", "de", "de_pl", "de_dat_pl", "de_gen", "g", "animate", "ctx", "senses")

    def __init__(self, en: str, de: str, g: str, cls: str = "") -> None:
        self.en, _, en_pl = en.partition("/")
        self.de, _, de_pl = de.partition("/")
        self.en_pl, self.g = en_pl or _en_plural(self.en), "mfn".index(g)
        self.de_pl = de_pl or _de_plural(self.de, self.g)
        self.de_dat_pl = self.de_pl if self.de_pl.endswith(("n", "s")) else self.de_pl + "n"
        short = self.de[-1] in _VOWELS or self.de.endswith(("er", "el", "en"))
        self.de_gen = self.de + ("s" if short else "es")
        self.animate = "p" in cls or "a" in cls
        self.ctx = frozenset(cls) - {"p", "a"}
        self.senses: tuple[str, Noun, Noun] | None = None  # ambiguous: (context class, sense if, sense else)

    def form(self, case: int, plural: bool) -> str:
        if plural:
            return self.de_dat_pl if case == DAT else self.de_pl
        return self.de_gen if case == GEN and self.g != 1 else self.de


class Verb:
    """A verb: English forms as token tuples; German present forms by person, infinitive, participle."""

    __slots__ = ("key", "kind", "en", "en_3sg", "en_past", "pres", "inf", "part", "particle", "sein")
    __slots__ += ("ctx", "alt")

    def __init__(self, kind: str, entry: str, ctx: str = "") -> None:
        en, past, de, part, pres3 = (entry.split(",") + ["", "", ""])[:5]
        self.key, self.kind, words, self.ctx = en, kind, en.split("_"), frozenset(ctx)
        self.en = tuple(words)
        third = words[0] + "es" if words[0].endswith(("o", "s", "x", "ch", "sh")) else _en_plural(words[0])
        self.en_3sg = (third, *words[1:])
        self.en_past = tuple(past.split("_")) if past else (_en_past(words[0]), *words[1:])
        self.sein = de.endswith("*")  # perfect with sein (motion verbs), else haben
        self.particle, _, self.inf = de.rstrip("*").rpartition("|")
        stem = self.inf[:-2] if self.inf.endswith("en") else self.inf[:-1]
        hard = stem.endswith(("t", "d")) or (stem[-1] in "mn" and stem[-2] not in _VOWELS + "lrhmn")
        e = "e" if hard else ""  # arbeit-e-t, öffn-e-t
        s3, e3 = (pres3, "") if pres3 else (stem, e)  # a strong verb's 2sg/3sg stem: sieh-st, sieh-t
        second = s3 + ("t" if s3.endswith(("s", "ß", "z", "x")) else e3 + "st")
        third = s3 + ("" if pres3.endswith("t") else e3 + "t")
        self.pres = (stem + "e", second, third, self.inf, self.inf)
        prefixed = self.inf.startswith(("be", "ver", "er", "ent", "zer", "ge", "emp"))
        no_ge = prefixed or self.inf.endswith("ieren")
        self.part = part or self.particle + ("" if no_ge else "ge") + stem + e + "t"
        self.alt: Verb | None = None  # run: laufen with an animate subject, else alt (funktionieren)


class Word:
    """An adjective, adverb, preposition or conjunction: English and German tokens, a kind, a variant."""

    __slots__ = ("en", "de", "kind", "de2")

    def __init__(self, en: str, de: str, kind: str = "", de2: str = "") -> None:
        self.en, self.de, self.kind, self.de2 = tuple(en.split("_")), tuple(de.split("_")), kind, de2

    def adj(self, ending: str) -> str:
        """The attributive adjective with an inflection ending (müde+e -> müde, dunkel+e -> dunkle)."""
        stem = self.de[0]
        if stem.endswith("e"):
            ending = ending[1:]
        elif stem.endswith("el") or stem == "teuer":
            stem = stem[:-2] + stem[-1]
        return stem + ending


class Lexicon:
    """Every word of both languages, parsed once from the tables above (see ``lexicon()``)."""

    def __init__(self) -> None:
        self.nouns: dict[str, Noun] = {}
        for line in _NOUNS.strip().splitlines():
            cls, *entries = line.split()
            for e in entries:
                noun = Noun(*e.split(":"), cls)
                self.nouns[noun.en] = noun
        items = _AMBIGUOUS.split()
        self.ambiguous: dict[str, Noun] = {}
        for i in range(0, len(items), 4):
            en, ctx, a, b = items[i : i + 4]
            amb = self.ambiguous[en] = Noun(en, "?", "n")
            amb.senses = (ctx, Noun(en, *a.split(":")), Noun(en, *b.split(":")))
        ctx = {key: c for c, _, key in (item.partition(":") for item in _VERB_CLASSES.split())}
        self.verbs: dict[str, Verb] = {}
        for line in _VERBS.strip().splitlines():
            kind, *entries = line.split()
            for e in entries:
                key = e.split(",")[0]
                self.verbs[key] = Verb(kind, e, ctx.get(key, ""))
        run = self.verbs["run"] = Verb("i", "run,ran,laufen*,gelaufen,läuf")
        run.alt = Verb("i", "run,ran,funktionieren")
        self.adjectives = {en: Word(en, de) for en, de in (e.split(":") for e in _ADJECTIVES.split())}
        self.adverbs: dict[str, Word] = {}
        for line in _ADVERBS.strip().splitlines():
            kind, *entries = line.split()
            self.adverbs |= {en: Word(en, de, kind) for en, de in (e.split("=") for e in entries)}
        preps = (e.split("=") for e in _PREPOSITIONS.split())
        self.prepositions = {en: Word(en, *de.split(":")) for en, de in preps}
        self.of = Word("of", "von", "D")  # "of" + no article or a numeral: von + dative
        conjs = (e.split("=") for e in _CONJUNCTIONS.split())
        self.conjunctions = {en: Word(en, de.split("/")[0], "", de.partition("/")[2]) for en, de in conjs}

    def source_words(self) -> set[str]:
        """Every word the source language can produce."""
        words = {"a", "an", "the", "not", "did", "be", "of", "that", "who", "which", "and", "but", "these"}
        words |= {"lot", *_DET_DE}
        words |= {*_BE_EN, *_WAS_EN, *_DO_EN, *_MODAL_EN.values(), *(w for p in _PRON_EN.values() for w in p)}
        words |= {w for n in [*self.nouns.values(), *self.ambiguous.values()] for w in (n.en, n.en_pl)}
        words |= {w for v in self.verbs.values() for form in (v.en, v.en_3sg, v.en_past) for w in form}
        for table in (self.adjectives, self.adverbs, self.prepositions, self.conjunctions):
            words |= {w for x in table.values() for w in x.en}
        return words


_LEXICON: Lexicon | None = None


def lexicon() -> Lexicon:
    """The lexicon, built on first use (nothing is computed at import time)."""
    global _LEXICON
    if _LEXICON is None:
        _LEXICON = Lexicon()
    return _LEXICON


# ----------------------------------------------------------------------------------------------------------
# Sentence trees and their two renderings


@dataclass(eq=False, slots=True)
class NP:
    """A noun phrase: a pronoun, or det adj* noun, modifiers ((preposition or None for "of", NP)), a relative
    clause and a coordinated second NP ("the man and the woman")."""

    noun: Noun | None = None
    det: str = "the"  # the a this no two three many some a_lot_of bare (plural, no article) or a possessive
    adjs: Sequence[Word] = ()
    plural: bool = False
    mods: Sequence[tuple[Word | None, NP]] = ()
    rel: Clause | None = None
    pron: str | None = None
    coord: NP | None = None
    ref: NP | None = None  # antecedent of "it", set while rendering the source


@dataclass(eq=False, slots=True)
class Clause:
    """A clause. kind: main, sub (after a conjunction), comp (after a verb of saying), rel (relative)."""

    kind: str = "main"
    subj: NP | None = None  # None in a relative clause whose gap is the subject
    verb: Verb | None = None  # None: copula with a predicative adjective
    tense: str = "pres"  # pres, past, fut, can, must
    neg: bool = False
    obj: NP | None = None
    adj: Word | None = None
    pps: Sequence[tuple[Word, NP]] = ()
    adv: Word | None = None
    front: object = None  # None, "adv", or (conjunction, Clause): what comes before the subject
    comp: Clause | None = None  # that-clause of a verb of saying
    that: bool = True  # English says "that" (German always says dass)
    subs: Sequence[tuple[Word, Clause]] = ()  # trailing adverbial clauses
    coord: tuple[str, Clause] | None = None  # ("and" | "but", next main clause)
    role: str | None = None  # relative clause: the gap is the "subj" or the "obj"
    head: NP | None = None  # relative clause: the noun phrase it modifies
    relword: str = "that"


def _person(np: NP) -> int:
    if np.pron:
        return _PRON_PERSON[np.pron]
    return 4 if np.plural or np.coord else 2


def _subject(c: Clause) -> NP:
    return c.head if c.role == "subj" else c.subj


class _Source:
    """Renders the English side; records context classes, ambiguous nouns and the antecedents of "it".

    ``unclear`` is set when an adjunct (prepositional phrase, adverb or clause) directly follows an embedded
    clause, because English does not say which of the two clauses it belongs to; such trees are not used.
    """

    def __init__(self) -> None:
        self.out: list[str] = []
        self.classes: set[str] = set()
        self.ambiguous: list[NP] = []
        self.last: NP | None = None  # the nearest singular inanimate noun so far
        self.end, self.unclear = -1, False  # where the last embedded clause ended

    def adjunct(self) -> None:
        self.unclear = self.unclear or len(self.out) == self.end

    def np(self, np: NP, obj: bool) -> None:
        out = self.out
        if np.pron:
            out.append(_PRON_EN[np.pron][obj])
            np.ref = self.last if np.pron == "it" else None
            return
        noun, det = np.noun, np.det
        words = [a.en[0] for a in np.adjs] + [noun.en_pl if np.plural else noun.en]
        if det == "a":
            out.append("an" if words[0][0] in "aeiou" else "a")
        elif det != "bare":
            out.extend(("these",) if det == "this" and np.plural else det.split("_"))
        out.extend(words)
        self.classes |= noun.ctx
        if noun.senses:
            self.ambiguous.append(np)
        if not np.plural and not noun.animate:
            self.last = np
        for prep, m in np.mods:
            out.extend(prep.en if prep else ("of",))
            self.np(m, True)
        if np.rel:
            self.clause(np.rel)
        if np.coord:
            out.append("and")
            self.np(np.coord, obj)

    def clause(self, c: Clause) -> None:
        out, t, v, p = self.out, c.tense, c.verb, _person(_subject(c))
        if isinstance(c.front, tuple):
            out.extend(c.front[0].en)
            self.clause(c.front[1])
            out.append(",")
        elif c.front == "adv":
            out.extend(c.adv.en)
        if c.kind == "rel":
            out.append(c.relword)
        if c.role != "subj":
            self.np(c.subj, False)
        neg = ("not",) if c.neg else ()
        if v is None:  # copula
            be = (
                (_MODAL_EN[t], *neg, "be")
                if t in _MODAL_EN
                else ((_BE_EN if t == "pres" else _WAS_EN)[p], *neg)
            )
            out.extend((*be, *c.adj.en))
        else:
            self.classes |= v.ctx
            if t in _MODAL_EN:
                vg = [_MODAL_EN[t], *neg, *v.en]
            elif c.neg:
                vg = [_DO_EN[p] if t == "pres" else "did", "not", *v.en]
            else:
                vg = list(v.en_past if t == "past" else v.en_3sg if p == 2 else v.en)
            obj = c.obj if c.role != "obj" else None
            late = vg.pop() if obj and obj.pron and v.en[-1] in _EN_PARTICLES else None  # call him up
            out.extend(vg)
            if obj:
                self.np(obj, True)
            if late:
                out.append(late)
        for prep, m in c.pps:
            self.adjunct()
            out.extend(prep.en)
            self.np(m, True)
        if c.adv and c.front != "adv":
            self.adjunct()
            out.extend(c.adv.en)
        if c.comp:
            self.adjunct()
            out.extend(("that",) if c.that else ())
            self.clause(c.comp)
        for conj, sub in c.subs:
            self.adjunct()
            out.extend(conj.en)
            self.clause(sub)
        if c.coord:
            out.extend(("and",) if c.coord[0] == "and" else (",", "but"))
            self.clause(c.coord[1])
        if c.kind != "main":
            self.end = len(out)


class _Target:
    """Renders the German side, once the ambiguous nouns are resolved and each "it" has its antecedent."""

    def __init__(self) -> None:
        self.out: list[str] = []

    def np(self, np: NP, case: int, prep: Word | None = None) -> None:
        out = self.out
        if np.pron:
            forms = _PRON_DE[np.pron] if np.pron != "it" else _IT_DE[np.ref.noun.g if np.ref else 2]
            out.extend((prep.de[0], forms[min(case, DAT)]) if prep else (forms[case],))  # wegen ihm
            return
        noun, det, gi = np.noun, np.det, 3 if np.plural else np.noun.g
        endings = None  # strong adjective endings
        if det == "the":
            art, endings = _DEF[case][gi], _WEAK
        elif det == "this":
            art, endings = "dies" + _DIES[case][gi], _WEAK
        elif det in ("a", "no") or det in _POSSESSIVES:
            art, endings = _DET_DE[det] + _EIN[case][gi], _MIXED
        elif det in ("many", "a_lot_of", "some"):
            art = _DET_DE[det] + _STRONG_PL[case]
        else:  # bare plural, zwei, drei
            art = _DET_DE.get(det)
        if prep:
            short = _CONTRACTIONS.get((prep.de[0], art))
            out.append(short or prep.de[0])
            art = None if short else art
        if art:
            out.append(art)
        ending = endings[case][gi] if endings else _STRONG_PL[case]
        out.extend(a.adj(ending) for a in np.adjs)
        out.append(noun.form(case, np.plural))
        for p, m in np.mods:
            if p is None and (m.pron or m.det not in ("the", "a", "this", "no", *_POSSESSIVES)):
                p = lexicon().of
            self.np(m, GEN if p is None else "NADG".index(p.kind[0]), p)
        if np.rel:
            out.append(",")
            self.clause(np.rel)
            out.append(",")
        if np.coord:
            out.append("und")
            self.np(np.coord, case)

    def clause(self, c: Clause) -> None:
        out, t, subj = self.out, c.tense, _subject(c)
        p, v = _person(subj), c.verb
        if (
            v is not None
            and v.alt is not None
            and (subj.pron == "it" or not subj.pron and not subj.noun.animate)
        ):
            v = v.alt
        if v is None:  # copula: the predicative adjective is not inflected
            fin = _MODAL_DE[t][p] if t in _MODAL_DE else (_SEIN if t == "pres" else _WAR)[p]
            right = ["sein"] if t in _MODAL_DE else []
        elif t == "pres":
            fin, right = v.pres[p], [v.particle] if v.particle else []
        elif t == "past":  # the English simple past becomes the German perfect: haben/sein ... participle
            fin, right = (_SEIN if v.sein else _HABEN)[p], [v.part]
        else:
            fin, right = _MODAL_DE[t][p], [v.particle + v.inf]
        obj = c.obj if c.role != "obj" else None
        adv = c.adv if c.front != "adv" else None
        mid = _Target()  # middle field: pronoun object, time adverb, object, PPs, nicht, manner adverb
        if obj and obj.pron:
            mid.np(obj, ACC)
        if adv and adv.kind == "T":
            mid.out.extend(adv.de)
        if obj and not obj.pron:
            mid.np(obj, ACC)
        for prep, m in c.pps:
            mid.np(m, "NADG".index(prep.kind[0]), prep)
        mid.out.extend(("nicht",) if c.neg else ())
        mid.out.extend(adv.de if adv and adv.kind == "M" else ())
        mid.out.extend(c.adj.de if c.adj else ())
        if c.kind == "main":  # verb second
            if isinstance(c.front, tuple):
                self.conj(*c.front)
                out.extend((",", fin))
                self.np(subj, NOM)
            elif c.front == "adv":
                out.extend((*c.adv.de, fin))
                self.np(subj, NOM)
            else:
                self.np(subj, NOM)
                out.append(fin)
            out.extend((*mid.out, *right))
        else:  # verb final; a separable particle joins the finite verb
            if c.kind == "rel":
                out.append(
                    _DEF[NOM if c.role == "subj" else ACC][3 if _person(c.head) == 4 else c.head.noun.g]
                )
            if c.role != "subj":
                self.np(subj, NOM)
            out.extend(mid.out)
            joined = t == "pres" and v is not None and v.particle
            out.extend((v.particle + fin,) if joined else (*right, fin))
        if c.comp:
            out.extend((",", "dass"))
            self.clause(c.comp)
            out.append(",")
        for conj, sub in c.subs:
            out.append(",")
            self.conj(conj, sub)
            out.append(",")
        if c.coord:
            out.extend(("und",) if c.coord[0] == "and" else (",", "aber"))
            self.clause(c.coord[1])

    def conj(self, conj: Word, sub: Clause) -> None:
        self.out.append(conj.de2 if conj.de2 and sub.tense != "past" else conj.de[0])  # when: als / wenn
        self.clause(sub)


def render_tokens(tree: Clause) -> tuple[list[str], list[str]]:
    """Source and target tokens (words and punctuation marks) of a sentence tree."""
    src, tgt, _ = _render(tree)
    return src, tgt


def _render(tree: Clause) -> tuple[list[str], list[str], bool]:
    src = _Source()
    src.clause(tree)
    src.out.append(".")
    for np in src.ambiguous:  # the sentence's context classes choose the sense
        ctx, if_ctx, other = np.noun.senses
        np.noun = if_ctx if ctx in src.classes else other
    tgt = _Target()
    tgt.clause(tree)
    tgt.out.append(".")
    out: list[str] = []
    for tok in tgt.out:  # no comma at the start, twice, or before the period
        if tok == "," and (not out or out[-1] == ","):
            continue
        if tok == "." and out and out[-1] == ",":
            out.pop()
        out.append(tok)
    return src.out, out, not src.unclear


def detokenize(tokens: list[str]) -> str:
    return " ".join(tokens).replace(" ,", ",").replace(" .", ".")


def render(tree: Clause) -> tuple[str, str]:
    """The (source, target) sentence pair of a tree."""
    src, tgt = render_tokens(tree)
    return detokenize(src), detokenize(tgt)


# ----------------------------------------------------------------------------------------------------------
# Random sentence trees


def _weights(spec: str) -> tuple[list[float], list[str]]:
    """ "a:3 b:1" -> cumulative probabilities and names, for ``_choose``."""
    names, cum, total = [], [], 0.0
    for item in spec.split():
        name, weight = item.rsplit(":", 1)
        total += float(weight)
        names.append(name)
        cum.append(total)
    return [c / total for c in cum], names


def _choose(rnd: random.Random, table: tuple[list[float], list[str]]) -> str:
    return table[1][bisect.bisect(table[0], rnd.random())]


_TENSES = _weights("pres:32 past:35 fut:12 can:11 must:10")
_CLAUSE_TYPES = _weights("t:50 i:22 run:5 c:10 be:13")
_PRONOUNS = _weights("i:12 you:10 he:18 she:18 it:22 we:10 they:10")
_PRONOUN_ODDS = {"subj": 0.22, "obj": 0.1}  # else 0.06
_PERSONS = _weights("i:12 you:10 he:18 she:18 we:10 they:10")  # animate subjects (of say, think, ...)
_POSS = " ".join(f"{p}:2" for p in _POSSESSIVES)
_DETS_SG = _weights(f"the:55 a:22 this:7 no:4 {_POSS}")
_DETS_PL = _weights(f"the:40 bare:14 this:6 no:4 two:3 three:3 many:3 some:3 a_lot_of:3 {_POSS}")


class _Zipf:
    """Draws items with probability proportional to (rank + q)^-s: a few frequent words and a long tail."""

    def __init__(self, items: list, s: float, q: float = 0.0) -> None:
        self.items, total, self.cum = items, 0.0, []
        for rank in range(1, len(items) + 1):
            total += (rank + q) ** -s
            self.cum.append(total)

    def draw(self, rnd: random.Random):
        return self.items[bisect.bisect(self.cum, rnd.random() * self.cum[-1])]


class _Sampler:
    """Random trees; ``long`` (test split) raises the odds of optional phrases and allows deeper nesting."""

    def __init__(self, rnd: random.Random, long: bool = False) -> None:
        lex = lexicon()
        nouns = sorted(lex.nouns.values(), key=lambda n: n.en)
        random.Random(20170612).shuffle(nouns)  # the language's fixed word frequencies, whatever the seed
        self.nouns = _Zipf(nouns, 1.4, 4.0)
        self.animate = _Zipf([n for n in nouns if n.animate], 1.0, 2.0)
        self.ambiguous = sorted(lex.ambiguous.values(), key=lambda n: n.en)
        self.verbs = {k: _Zipf([v for v in lex.verbs.values() if v.kind == k], 0.8) for k in "tic"}
        self.run = lex.verbs["run"]
        self.adjectives = _Zipf(list(lex.adjectives.values()), 0.8)
        self.adverbs = list(lex.adverbs.values())
        self.preps = list(lex.prepositions.values())
        self.noun_preps = [p for p in self.preps if p.kind.endswith("*")]
        self.conjs = list(lex.conjunctions.values())
        self.rnd, self.k, self.max_depth = rnd, (2.2 if long else 1.0), (3 if long else 2)
        self.p_adj = 0.28 * min(self.k, 1.5)

    def sentence(self) -> Clause:
        rnd, r, k = self.rnd, self.rnd.random, self.k
        c = self.clause("main", 0)
        if c.front is None and r() < 0.08 * k:
            c.front = (rnd.choice(self.conjs), self.clause("sub", 1))
        if r() < 0.15 * k:
            c.subs = [*c.subs, (rnd.choice(self.conjs), self.clause("sub", 1))]
        if r() < 0.07 * k:
            c.coord = ("and" if r() < 0.6 else "but", self.clause("main", 1))
        return c

    def clause(self, kind: str, depth: int, head: NP | None = None, role: str | None = None) -> Clause:
        rnd, r, k = self.rnd, self.rnd.random, self.k
        what = "t" if role == "obj" else _choose(rnd, _CLAUSE_TYPES)
        what = "t" if what == "c" and depth >= self.max_depth else what
        verb = None if what == "be" else self.run if what == "run" else self.verbs[what].draw(rnd)
        adj = self.adjectives.draw(rnd) if verb is None else None
        c = Clause(kind, verb=verb, tense=_choose(rnd, _TENSES), neg=r() < 0.1, adj=adj, role=role, head=head)
        if kind == "rel":
            c.relword = "that" if r() < 0.5 else "who" if head.noun.animate else "which"
        if role != "subj":
            c.subj = self.np(depth, "subj", animate=what == "c")
        if what == "t" and role != "obj":
            c.obj = self.np(depth, "obj")
        if r() < 0.2 * k:
            c.pps = [(rnd.choice(self.preps), self.np(depth + 1, "pp"))]
        if r() < 0.25:
            c.adv = rnd.choice(self.adverbs)
            if kind == "main" and c.adv.kind == "T" and r() < 0.35:
                c.front = "adv"
        if what == "c":
            c.comp, c.that = self.clause("comp", depth + 1), r() < 0.8
        elif kind != "main" and depth < self.max_depth and r() < 0.05 * k:
            c.subs = [(rnd.choice(self.conjs), self.clause("sub", depth + 1))]
        return c

    def np(self, depth: int, role: str, animate: bool = False) -> NP:
        rnd, r, k = self.rnd, self.rnd.random, self.k
        if r() < _PRONOUN_ODDS.get(role, 0.06):
            return NP(pron=_choose(rnd, _PERSONS if animate else _PRONOUNS))
        if not animate and r() < 0.045:
            noun = rnd.choice(self.ambiguous)
        else:
            noun = (self.animate if animate or (role == "subj" and r() < 0.5) else self.nouns).draw(rnd)
        plural = r() < 0.3
        np = NP(noun, _choose(rnd, _DETS_PL if plural else _DETS_SG), plural=plural)
        if r() < self.p_adj:
            adjs = [self.adjectives.draw(rnd)]
            while r() < self.p_adj and len(adjs) < 3:
                adj = self.adjectives.draw(rnd)
                if adj not in adjs:
                    adjs.append(adj)
            np.adjs = adjs
        if depth < self.max_depth and r() < 0.14 * k:
            np.mods = [(None if r() < 0.4 else rnd.choice(self.noun_preps), self.np(depth + 1, "pp"))]
        if depth < self.max_depth and not np.mods and r() < 0.08 * k:  # a relative clause ends its NP
            np.rel = self.clause("rel", depth + 1, head=np, role="subj" if r() < 0.6 else "obj")
        elif role in ("subj", "obj") and depth == 0 and r() < 0.04:
            np.coord = self.np(depth + 1, "coord")
        return np


def sample_pairs(rnd: random.Random, n: int, lengths: tuple[int, int], *, long: bool = False, exclude=None):
    """``n`` distinct (source, target) pairs with ``lengths[0] <= source tokens <= lengths[1]``.

    Sources in the set ``exclude`` are skipped, and the new ones are added to it, so consecutive calls give
    splits that share no source sentence.
    """
    seen: set[str] = exclude if exclude is not None else set()
    sampler, pairs, tries = _Sampler(rnd, long), [], 0
    while len(pairs) < n:
        tries += 1
        if tries > 100 * n + 10000:
            raise RuntimeError(f"could not draw {n} distinct synthetic sentences of {lengths} tokens")
        src, tgt, clear = _render(sampler.sentence())
        if clear and lengths[0] <= len(src) <= lengths[1]:
            s = detokenize(src)
            if s not in seen:
                seen.add(s)
                pairs.append((s, detokenize(tgt)))
    return pairs


def generate(
    seed: int, train_pairs: int, eval_pairs: int, max_words: int = TRAIN_LENGTHS[1]
) -> tuple[list, list, list]:
    """(train, dev, test) pair lists, a pure function of the arguments.

    Train and dev sources have TRAIN_LENGTHS[0]..max_words tokens; test sources are longer than any of them
    (max_words + 1 .. max_words + 20), so the test split always measures length generalisation.

    Dev and test are drawn first, so they do not change with ``train_pairs``; no source sentence appears
    twice in the corpus.
    """
    seen: set[str] = set()
    train_lengths = (TRAIN_LENGTHS[0], max_words)
    test_lengths = (max_words + 1, max_words + TEST_LENGTHS[1] - TEST_LENGTHS[0] + 1)
    dev = sample_pairs(random.Random(f"synthetic/{seed}/dev"), eval_pairs, train_lengths, exclude=seen)
    test_rnd = random.Random(f"synthetic/{seed}/test")
    test = sample_pairs(test_rnd, eval_pairs, test_lengths, long=True, exclude=seen)
    train = sample_pairs(random.Random(f"synthetic/{seed}/train"), train_pairs, train_lengths, exclude=seen)
    return train, dev, test
